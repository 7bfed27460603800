"""End to end on a small synthetic data set: train one epoch, evaluate, predict (real TensorFlow)."""

import csv
import json

import cv2
import numpy as np
import pytest

from brainmri.cli import cli
from brainmri.training.dataset import load_dataset
from brainmri.imaging import load_scan
from brainmri.inference import CLASSES
from brainmri.inference import read_model_card

pytestmark = pytest.mark.slow

FOLDERS = {"glioma": "glioma_tumor", "meningioma": "meningioma_tumor", "no_tumor": "no_tumor",
           "pituitary": "pituitary_tumor"}


def _synthetic_scan(label: str, seed: int) -> np.ndarray:
    """A dark background, a grey 'head', and a bright blob whose place encodes the class."""
    rng = np.random.default_rng(seed)
    image = np.zeros((96, 96), np.uint8)
    cv2.ellipse(image, (48, 48), (34, 40), 0, 0, 360, 90, -1)
    spots = {"glioma": (34, 40), "meningioma": (62, 30), "pituitary": (48, 66)}
    if label in spots:
        x, y = spots[label]
        cv2.circle(image, (x + int(rng.integers(-3, 4)), y + int(rng.integers(-3, 4))), 8, 240, -1)
    noise = rng.normal(0, 6, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    seed = 0
    for split, count in (("Training", 14), ("Testing", 4)):
        for label, folder in FOLDERS.items():
            (root / split / folder).mkdir(parents=True)
            for i in range(count):
                seed += 1
                cv2.imwrite(str(root / split / folder / f"scan ({i}).png"), _synthetic_scan(label, seed))
    return root


@pytest.fixture(scope="module")
def trained(synthetic_data, tmp_path_factory):
    from click.testing import CliRunner

    out = tmp_path_factory.mktemp("model")
    cache = tmp_path_factory.mktemp("cache")
    result = CliRunner().invoke(cli, [
        "train", "--data", str(synthetic_data), "--out", str(out), "--size", "32",
        "--epochs", "1", "--batch-size", "8", "--cache-dir", str(cache),
    ])
    assert result.exit_code == 0, result.output
    return out / "brainmri_cnn.h5", cache


def test_train_writes_model_metadata_history_and_splits(trained, synthetic_data):
    model_path, _ = trained
    card = read_model_card(model_path)  # validates sha256 and fields
    assert card.classes == CLASSES and card.input_size == 32
    meta = card.raw
    assert meta["training"]["command"].startswith("uv run brainmri train --data")
    assert meta["training"]["epochs_run"] == 1
    counts = meta["training"]["split_counts"]
    assert sum(counts["official_test"].values()) == 16
    manifest = json.loads(model_path.with_suffix(".splits.json").read_text())
    assert manifest["collections"] == [synthetic_data.name]
    splits = manifest["splits"]
    testing = f"{synthetic_data.name}/Testing/"  # paths name their collection
    assert not set(splits["test"]) & set(splits["train"])
    assert all(path.startswith(testing) for path in splits["official_test"])
    assert not any(path.startswith(testing) for path in splits["train"] + splits["val"])
    history = json.loads(model_path.with_suffix(".history.json").read_text())
    assert len(history["loss"]) == 1


def test_evaluate_writes_metrics_and_plots(trained, synthetic_data, tmp_path):
    from click.testing import CliRunner

    model_path, cache = trained
    result = CliRunner().invoke(cli, ["evaluate", "--data", str(synthetic_data), "--model",
                                      str(model_path), "--out", str(tmp_path), "--cache-dir",
                                      str(cache), "--write-metadata"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    c = synthetic_data.name  # sets are named "<collection>/<set>"
    assert {f"{c}/{name}" for name in ("test", "val", "official_test", "official_test_novel")} \
        <= set(metrics["sets"])
    official = metrics["sets"][f"{c}/official_test"]
    assert official["images"] == 16
    assert sum(map(sum, official["confusion_matrix"]["rows_true_cols_predicted"])) == 16
    assert set(official["per_class"]) == set(CLASSES)
    assert {"sensitivity", "specificity"} <= set(official["tumor_vs_no_tumor"])
    for name in (f"confusion_{c}_official_test.png", f"roc_{c}_official_test.png",
                 f"reliability_{c}_test.png", f"confidence_{c}_test.png", "training_curves.png"):
        assert (tmp_path / name).stat().st_size > 1000
    # The headline figures are stored in the metadata, and the sha256 still verifies.
    card = read_model_card(model_path)
    assert card.raw["evaluation"][f"{c}/official_test"]["images"] == 16


def test_predict_writes_csv_with_error_rows(trained, synthetic_data, tmp_path):
    from click.testing import CliRunner

    model_path, _ = trained
    folder = tmp_path / "batch"
    (folder / "nested").mkdir(parents=True)
    cv2.imwrite(str(folder / "nested" / "a.png"), _synthetic_scan("glioma", 999))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    single = synthetic_data / "Testing" / "no_tumor" / "scan (0).png"
    out_csv = tmp_path / "out.csv"
    result = CliRunner().invoke(cli, ["predict", str(folder), str(single), "--csv", str(out_csv),
                                      "--model", str(model_path)])
    assert result.exit_code == 0, result.output
    with out_csv.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][:7] == ["path", "label", "confidence", "glioma", "meningioma", "no_tumor",
                           "pituitary"]
    by_path = {row[0]: dict(zip(rows[0], row)) for row in rows[1:]}
    assert len(by_path) == 3
    broken = by_path[str(folder / "broken.jpg")]
    assert broken["label"] == "" and broken["error"]
    good = by_path[str(single)]
    probabilities = [float(good[c]) for c in CLASSES]
    assert abs(sum(probabilities) - 1) < 1e-4
    assert good["label"] in CLASSES and float(good["confidence"]) == pytest.approx(max(probabilities), abs=1e-5)


def test_cache_holds_exactly_what_serving_computes(synthetic_data, trained):
    """Training reads the cache; serving calls load_scan: they must agree bit for bit."""
    _, cache = trained
    data = load_dataset(synthetic_data, 32, cache_dir=cache)
    for i in (0, len(data.paths) - 1):
        served = load_scan(data.file(i).read_bytes(), 32)
        np.testing.assert_array_equal(data.images[i], served)


@pytest.fixture(scope="module")
def second_model(trained, synthetic_data):
    """A MobileNetV2 trained one epoch on the same data, seed and grouping (same splits)."""
    from click.testing import CliRunner

    model_path, cache = trained
    result = CliRunner().invoke(cli, [
        "train", "--data", str(synthetic_data), "--out", str(model_path.parent), "--size", "32",
        "--epochs", "1", "--batch-size", "8", "--cache-dir", str(cache), "--arch", "mobilenetv2",
    ])
    assert result.exit_code == 0, result.output
    return model_path.parent / "brainmri_mobilenetv2.h5"


def test_train_arch_records_what_was_built(second_model):
    """--arch picks the network, names the file, and the metadata says which layer Grad-CAM reads."""
    meta = read_model_card(second_model).raw
    assert meta["arch"] == "mobilenetv2" and meta["weights"] == "none"
    assert meta["last_conv_layer"] == "out_relu"
    assert "--arch mobilenetv2" in meta["training"]["command"]
    assert meta["training"]["config"]["learning_rate"] == 2e-3


def test_compare_measures_every_model_on_the_same_splits(trained, second_model, synthetic_data,
                                                         tmp_path):
    """One table, one JSON and one plot with a row per model, each measured on the same images."""
    from click.testing import CliRunner

    model_path, cache = trained
    result = CliRunner().invoke(cli, [
        "compare", "--data", str(synthetic_data), "--model", str(model_path), "--model",
        str(second_model), "--out", str(tmp_path), "--cache-dir", str(cache), "--latency-runs", "5",
    ])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "compare.json").read_text())
    rows = {row["name"]: row for row in report["models"]}
    assert set(rows) == {"brainmri_cnn", "brainmri_mobilenetv2"}
    c = synthetic_data.name
    for row in rows.values():
        assert row["sets"][f"{c}/official_test"]["images"] == 16
        assert (row["sets"][f"{c}/test"]["images"]
                == rows["brainmri_cnn"]["sets"][f"{c}/test"]["images"])
        assert row["latency_ms"] > 0 and row["file_mb"] > 0 and row["epochs"] == 1
    table = (tmp_path / "compare.md").read_text()
    assert table.count("| brainmri_") == 2
    assert (tmp_path / "compare.png").stat().st_size > 5000


def test_compare_refuses_models_from_different_splits(trained, second_model, synthetic_data,
                                                      tmp_path):
    """Figures from different test splits are not comparable: the command says so and stops."""
    from click.testing import CliRunner

    model_path, cache = trained
    other = tmp_path / "other"
    other.mkdir()
    for suffix in (".h5", ".json", ".splits.json"):
        source = second_model.with_suffix(suffix)
        (other / source.name).write_bytes(source.read_bytes())
    manifest_path = other / "brainmri_mobilenetv2.splits.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["splits"]["test"], manifest["splits"]["train"] = (
        manifest["splits"]["train"][:3], manifest["splits"]["test"] + manifest["splits"]["train"][3:])
    manifest_path.write_text(json.dumps(manifest))
    result = CliRunner().invoke(cli, [
        "compare", "--data", str(synthetic_data), "--model", str(model_path), "--model",
        str(other / "brainmri_mobilenetv2.h5"), "--out", str(tmp_path), "--cache-dir", str(cache),
    ])
    assert result.exit_code != 0
    assert "differently" in result.output
