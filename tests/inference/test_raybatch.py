"""`brainmri predict --engine ray`: the plain engine's CSV, computed by Ray tasks and actors."""

from __future__ import annotations

import csv
import io

from pathlib import Path

import pytest
from click.testing import CliRunner

from brainmri.cli import cli
from brainmri.config import DEFAULTS
from brainmri.imaging import ImageError

from conftest import encode
from conftest import synthetic_slice
from test_predict_cli import colour_photo

CNN = Path(DEFAULTS["BRAINMRI_MODEL_DIR"]) / "brainmri_cnn.h5"


def test_errors_survive_the_trip_through_ray_columns():
    """What Outcome reads (ImageError code and message; other errors' type name) comes back."""
    from brainmri.inference.raybatch import _decode_error
    from brainmri.inference.raybatch import _encode_error

    stage, error = _decode_error(_encode_error("prepare", ImageError("corrupt_image", "Broken.")))
    assert stage == "prepare" and isinstance(error, ImageError)
    assert (error.code, error.message) == ("corrupt_image", "Broken.")
    stage, error = _decode_error(_encode_error("read", FileNotFoundError(2, "gone")))
    assert stage == "read" and type(error) is FileNotFoundError

    class Odd(Exception):
        pass

    _, error = _decode_error(_encode_error("prepare", Odd("x")))
    assert type(error).__name__ == "Odd"


def test_address_needs_the_ray_engine(tmp_path):
    """--address without --engine ray is a mistake, said before any work."""
    image = tmp_path / "a.png"
    image.write_bytes(encode(synthetic_slice()))
    result = CliRunner().invoke(cli, ["predict", str(image), "--csv", str(tmp_path / "o.csv"),
                                      "--address", "auto"])
    assert result.exit_code != 0 and "--engine ray" in result.output


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    """A handful of files: brain-like slices, a colour photo, a damaged PNG, a text file."""
    root = tmp_path / "inbox"
    (root / "sub").mkdir(parents=True)
    for seed in range(4):
        (root / f"slice{seed}.png").write_bytes(encode(synthetic_slice(160, seed=seed)))
    (root / "sub" / "slice.jpg").write_bytes(encode(synthetic_slice(192, seed=9), ".jpg"))
    (root / "photo.jpg").write_bytes(encode(colour_photo(), ".jpg"))
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but nothing after the signature")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for this module's runs (the engine reuses a running one)."""
    import brainmri.inference.raybatch  # noqa: F401  (sets Ray's environment before ray is imported)

    ray = pytest.importorskip("ray")
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def model_copy(tmp_path_factory) -> Path:
    """One copy of the real CNN for every run: model/ may be retrained meanwhile."""
    from brainmri.inference.export import snapshot_model

    if not CNN.is_file():
        pytest.skip(f"{CNN} is not there (train it first)")
    return snapshot_model(CNN, tmp_path_factory.mktemp("cnn"))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("guard", [[], ["--no-guard"]], ids=["guarded", "no-guard"])
def test_ray_engine_writes_the_plain_engines_csv(guard, inbox, model_copy, local_ray, tmp_path):
    """Same files, same real model: byte-identical CSV and the same summary, on a local Ray.

    Guarded, the real model refuses these synthetic slices; with --no-guard they are classified,
    so the probabilities and "uncertain" flags are compared too.
    """
    outputs = {}
    for engine in ("plain", "ray"):
        out = tmp_path / engine / "out.csv"
        out.parent.mkdir()
        # Chunks of 3: several forward passes and several Ray tasks, the last chunk short.
        result = CliRunner().invoke(cli, ["predict", str(inbox), "--csv", str(out), "--model",
                                          str(model_copy), "--batch-size", "3", "--engine",
                                          engine, *guard])
        assert result.exit_code == 0, result.output
        summary = result.stdout.strip().splitlines()[-1].replace(str(out), "OUT")
        outputs[engine] = (out.read_text(encoding="utf-8"), summary)
    # Same answers: every label, flag, reason and count identical; probabilities equal to the
    # CSV's last digit (1e-6), since oneDNN may sum a differently sized batch in another order.
    (ray_csv, ray_summary), (plain_csv, plain_summary) = outputs["ray"], outputs["plain"]
    assert ray_summary == plain_summary
    ray_rows, plain_rows = (list(csv.DictReader(io.StringIO(t))) for t in (ray_csv, plain_csv))
    assert len(ray_rows) == len(plain_rows)
    numeric = {"confidence", "glioma", "meningioma", "no_tumor", "pituitary", "tumor_probability"}
    for ray_row, plain_row in zip(ray_rows, plain_rows):
        assert {k: v for k, v in ray_row.items() if k not in numeric} == \
            {k: v for k, v in plain_row.items() if k not in numeric}
        for key in numeric:
            if plain_row[key]:
                assert float(ray_row[key]) == pytest.approx(float(plain_row[key]), abs=1.5e-6)
            else:
                assert ray_row[key] == ""
    csv_text, summary = outputs["ray"]
    assert len(csv_text.strip().splitlines()) == 1 + 7  # header + every image file, in order
    assert summary.endswith("1 unreadable, 1 skipped")
    if guard:
        assert summary.startswith("Wrote OUT: 6 classified")
