"""`brainmri predict`: the page's and the API's guard, calibration and "uncertain" flag, as CSV."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from brainmri.cli import cli
from brainmri.config import DEFAULTS
from brainmri.inference import CLASSES
from brainmri.inference import PREDICT_COLUMNS

from conftest import FakePredictor
from conftest import encode
from conftest import synthetic_slice

SHIPPED = Path(DEFAULTS["BRAINMRI_MODEL_DIR"]) / "brainmri_cnn.h5"


class ScreeningPredictor(FakePredictor):
    """The fake with a guard that refuses colourful uploads, and a record of each forward pass."""

    def __init__(self, uncertain_below: float | None = None) -> None:
        super().__init__()
        self.uncertain_below = uncertain_below
        self.batches: list[int] = []

    def reasons(self, image: np.ndarray, colourfulness: float | None) -> tuple[str, ...]:
        """Refuse on the real colour measurement of the upload (from its one decode)."""
        return ("colourfulness",) if (colourfulness or 0.0) > 0.1 else ()

    def predict_checked_batch(self, images, colourfulness=None, guard: bool = True,
                              peaks=None) -> list:
        """Record the batch size, then screen and classify."""
        self.batches.append(len(images))
        return super().predict_checked_batch(images, colourfulness, guard, peaks)


def colour_photo(size: int = 160) -> np.ndarray:
    """A colourful, photo-like BGR image: a jet-coloured gradient with blobs, no dark border."""
    ramp = np.tile(np.linspace(0, 255, size, dtype=np.float32), (size, 1))
    grey = (0.5 * ramp + 0.5 * ramp.T).astype(np.uint8)
    cv2.circle(grey, (size // 3, size // 3), size // 6, 30, -1)
    return cv2.applyColorMap(grey, cv2.COLORMAP_JET)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Two brain-like slices, a colour photo, a damaged PNG, two .webp files and a .txt."""
    root = tmp_path / "inbox"
    (root / "sub").mkdir(parents=True)
    (root / "brain.png").write_bytes(encode(synthetic_slice(160, seed=1)))
    (root / "sub" / "brain2.jpeg").write_bytes(encode(synthetic_slice(160, seed=2), ".jpg"))
    (root / "photo.jpg").write_bytes(encode(colour_photo(), ".jpg"))
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but nothing after the signature")
    (root / "a.webp").write_bytes(encode(synthetic_slice(), ".webp"))
    (root / "sub" / "B.WEBP").write_bytes(encode(synthetic_slice(), ".webp"))
    (root / "notes.txt").write_text("not an image")
    return root


def run_predict(tmp_path: Path, *args: str) -> tuple[object, list[str], dict[str, dict[str, str]]]:
    """Run `brainmri predict ARGS --csv out.csv`; return the result, CSV header and rows by name."""
    out = tmp_path / "out.csv"
    result = CliRunner().invoke(cli, ["predict", *args, "--csv", str(out)])
    assert result.exit_code == 0, result.output
    with out.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    by_name = {Path(row[0]).name: dict(zip(rows[0], row)) for row in rows[1:]}
    return result, rows[0], by_name


@pytest.fixture
def fake(monkeypatch) -> ScreeningPredictor:
    """The fake installed as the CLI's model (no TensorFlow)."""
    predictor = ScreeningPredictor()
    monkeypatch.setattr("brainmri.inference.Predictor.from_path", lambda *a, **k: predictor)
    return predictor


@pytest.fixture
def model_file(tmp_path: Path) -> str:
    """A path for --model (it must exist; the fake never reads it)."""
    path = tmp_path / "model.h5"
    path.write_bytes(b"unused")
    return str(path)


def test_columns_refusal_and_skipped_report(fake, folder, model_file, tmp_path):
    """The guard refuses the photo (no class, a reason); other suffixes are counted, not hidden."""
    result, header, rows = run_predict(tmp_path, str(folder), "--model", model_file)
    assert header == ["path", "label", "confidence", *CLASSES, "tumor_probability", "error",
                      "refused", "reason", "uncertain"] == PREDICT_COLUMNS
    assert sorted(rows) == ["brain.png", "brain2.jpeg", "broken.png", "photo.jpg"]
    photo = rows["photo.jpg"]
    assert photo["refused"] == "true" and photo["error"] == "" and photo["uncertain"] == ""
    no_class = ("label", "confidence", *CLASSES, "tumor_probability")
    assert all(photo[column] == "" for column in no_class)
    assert photo["reason"].startswith("This does not look like a brain MRI slice (it is in colour")
    for name in ("brain.png", "brain2.jpeg"):
        assert rows[name]["label"] == "glioma" and rows[name]["refused"] == "false"
        assert rows[name]["reason"] == "" and rows[name]["error"] == ""
        assert rows[name]["uncertain"] == "false"  # 0.625 against the default 0.6
        assert sum(float(rows[name][c]) for c in CLASSES) == pytest.approx(1.0)
    broken = rows["broken.png"]
    assert broken["error"] and broken["label"] == "" and broken["refused"] == "false"
    assert "Skipped 3 files that are not PNG, JPEG or DICOM: 2 .webp, 1 .txt" in result.stdout
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.endswith("2 classified (0 uncertain), 1 refused, 1 unreadable, 3 skipped")


def test_no_guard_gives_the_refused_file_a_class(fake, folder, model_file, tmp_path):
    """--no-guard: research use; the photo gets a class, with a warning on stderr."""
    result, _, rows = run_predict(tmp_path, str(folder), "--model", model_file, "--no-guard")
    photo = rows["photo.jpg"]
    assert photo["label"] == "glioma" and photo["refused"] == "false" and photo["reason"] == ""
    assert "Guard off" in result.stderr
    assert result.stdout.strip().endswith("3 classified (0 uncertain), 0 refused, 1 unreadable, "
                                          "3 skipped")


def test_uncertain_uses_the_models_fitted_threshold(fake, folder, model_file, tmp_path):
    """The fitted threshold from the metadata (0.7 > 0.625) flags every answer, guard or not."""
    fake.uncertain_below = 0.7
    for extra in ((), ("--no-guard",)):
        result, _, rows = run_predict(tmp_path, str(folder), "--model", model_file, *extra)
        assert rows["brain.png"]["uncertain"] == "true"
        assert rows["brain.png"]["label"] == "glioma"  # flagged, still classified
    assert "3 classified (3 uncertain)" in result.stdout


def test_files_of_a_chunk_share_one_forward_pass(fake, folder, model_file, tmp_path):
    """Chunks of --batch-size files: the decodable ones go through the model together."""
    run_predict(tmp_path, str(folder), "--model", model_file, "--batch-size", "2")
    # Sorted: brain.png, broken.png | photo.jpg, sub/brain2.jpeg; broken.png never decodes.
    assert fake.batches == [1, 2]
    fake.batches.clear()
    run_predict(tmp_path, str(folder), "--model", model_file)
    assert fake.batches == [3]


def test_a_file_named_directly_is_tried_whatever_its_suffix(fake, folder, model_file, tmp_path):
    """Only folder contents are filtered by suffix; a named file gets its row (here an error)."""
    result, _, rows = run_predict(tmp_path, str(folder / "notes.txt"), str(folder / "brain.png"),
                                  "--model", model_file)
    assert sorted(rows) == ["brain.png", "notes.txt"]
    assert rows["notes.txt"]["error"] and rows["notes.txt"]["refused"] == "false"
    assert "Skipped" not in result.output
    assert result.stdout.strip().endswith("0 skipped")


def test_cli_and_api_give_the_same_answers(app, fake, folder, model_file, tmp_path):
    """One path: the batch API's answer for each file is the CLI's row for it."""
    from brainmri.web import EXTENSION_KEY

    app.extensions[EXTENSION_KEY] = fake
    _, _, rows = run_predict(tmp_path, str(folder), "--model", model_file)
    names = sorted(rows)
    form = {"files": [(io.BytesIO(next(folder.rglob(name)).read_bytes()), name) for name in names]}
    response = app.test_client().post("/api/v1/predict/batch", data=form,
                                      content_type="multipart/form-data")
    for name, item in zip(names, response.get_json()["results"]):
        row = rows[name]
        if "error" in item:
            assert item["error"]["message"] == (row["reason"] or row["error"])
            assert (item["error"]["code"] == "not_brain_mri") == (row["refused"] == "true")
        else:
            assert item["label"] == row["label"] and row["refused"] == "false"
            assert str(item["uncertain"]).lower() == row["uncertain"]
            assert item["confidence"] == pytest.approx(float(row["confidence"]), abs=1e-6)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_shipped_model_refuses_the_photo_and_no_guard_classifies_it(folder, tmp_path):
    """The real model and its fitted guard: the colour photo is refused, --no-guard classifies it;
    every row equals the single-upload path's answer for that file."""
    from brainmri import inference
    from brainmri.inference import Predictor

    result, _, rows = run_predict(tmp_path, str(folder), "--model", str(SHIPPED))
    photo = rows["photo.jpg"]
    assert photo["refused"] == "true" and photo["label"] == "" and "colour" in photo["reason"]
    assert "Skipped 3 files that are not PNG, JPEG or DICOM: 2 .webp, 1 .txt" in result.stdout
    predictor = Predictor.from_path(SHIPPED)
    threshold = inference.uncertain_threshold(predictor, DEFAULTS["BRAINMRI_UNCERTAIN_BELOW"])
    assert threshold == predictor.uncertain_below  # the fitted one, not the default
    for name, row in rows.items():
        data = next(folder.rglob(name)).read_bytes()
        single = inference.classify_many(predictor, [data], threshold)[0]
        assert single.refused == (row["refused"] == "true"), name
        if single.prediction is not None:
            assert single.prediction.label == row["label"]
            assert str(single.prediction.uncertain).lower() == row["uncertain"]
            for c in CLASSES:
                assert single.prediction.probabilities[c] == pytest.approx(float(row[c]), abs=1e-4)
    _, _, unguarded = run_predict(tmp_path, str(folder), "--model", str(SHIPPED), "--no-guard")
    photo = unguarded["photo.jpg"]
    assert photo["label"] in CLASSES and photo["refused"] == "false"
    assert photo["uncertain"] in ("true", "false")
