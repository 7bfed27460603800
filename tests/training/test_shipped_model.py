"""Regression tests of the shipped model on the real collections (inference is deterministic).

SARTAJ is read from $BRAINMRI_DATA, else ../shared/data/sartaj, LGG from $BRAINMRI_LGG_DATA,
else ../shared/data/lgg, and BraTS from $BRAINMRI_BRATS_DATA, else ../shared/data/brats, beside
the checkout. When one is missing these tests skip with the
reason, except under CI=true, where they fail.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from brainmri.training import dedup
from brainmri.config import DEFAULTS
from brainmri.inference import CLASSES

from conftest import REAL_DATA
from conftest import require_brats_data
from conftest import require_lgg_data
from conftest import require_real_data

pytestmark = [pytest.mark.slow, pytest.mark.realdata]

DATA = REAL_DATA
MODEL = Path(DEFAULTS["BRAINMRI_MODEL_DIR"]) / "brainmri_cnn.h5"  # the custom CNN's figures


@pytest.fixture(scope="module")
def shipped():
    """The shipped predictor, loaded, and both cached real collections at its input size."""
    from brainmri.training.dataset import load_datasets
    from brainmri.inference import Predictor

    # BraTS too: the model never trained on it, and its report scores it as unseen
    # (leave-one-collection-out), so every recorded set can be recomputed.
    roots = [require_real_data(), require_lgg_data(), require_brats_data()]
    predictor = Predictor.from_path(MODEL)  # verifies the sha256 in the metadata
    predictor.load()
    return predictor, load_datasets(roots, predictor.input_size)


def _accuracy(predictor, data, indices) -> float:
    probs = np.concatenate([predictor.predict_arrays(data.images[indices[i : i + 128]])
                            for i in range(0, len(indices), 128)])
    predicted = [predictor.labels[k] for k in probs.argmax(1)]
    return float(np.mean([p == data.labels[i] for p, i in zip(predicted, indices)]))


def _manifest() -> dict:
    from brainmri.training.splits import manifest_splits

    return manifest_splits(json.loads(MODEL.with_suffix(".splits.json").read_text()))


def _split(data, name: str, collection: str) -> np.ndarray:
    index = {path: i for i, path in enumerate(data.paths)}
    return np.array([index[p] for p in _manifest()[name] if p.startswith(f"{collection}/")])


def test_official_testing_accuracy_stays_above_target(shipped):
    predictor, data = shipped
    official = np.array([i for i, s in enumerate(data.sources) if s == "test"])
    assert len(official) == 394
    accuracy = _accuracy(predictor, data, official)
    assert accuracy >= 0.78
    # The figure in the metadata is the one this deterministic model reproduces.
    recorded = predictor.card.raw["evaluation"]["sartaj/official_test"]["accuracy"]
    assert accuracy == pytest.approx(recorded, abs=1e-3)


def test_leakage_free_test_split_accuracy_stays_above_target(shipped):
    predictor, data = shipped
    assert _accuracy(predictor, data, _split(data, "test", "sartaj")) >= 0.92


def test_lgg_held_out_patients_reproduce_the_recorded_figures(shipped):
    """The any-tumour sensitivity and specificity in the metadata, per sequence, on LGG patients
    the model never trained on (blank slices excluded, as the evaluation does)."""
    from brainmri.training.dataset import no_head_in_view

    predictor, data = shipped
    test = _split(data, "test", "lgg")
    test = test[~no_head_in_view(data.images[test])]
    probs = np.concatenate([predictor.predict_arrays(data.images[test[i : i + 256]])
                            for i in range(0, len(test), 256)])
    no_tumor = predictor.labels.index("no_tumor")
    said_tumor = probs.argmax(1) != no_tumor
    is_tumor = np.array([data.labels[i] != "no_tumor" for i in test])
    recorded = predictor.card.raw["evaluation"]["lgg/test"]["by_sequence"]
    sequences = np.array([data.sequences[i] for i in test])
    assert set(recorded) == {"t1", "t1c", "flair"}
    for sequence, figures in recorded.items():
        keep = sequences == sequence
        sensitivity = said_tumor[keep & is_tumor].mean()
        specificity = (~said_tumor[keep & ~is_tumor]).mean()
        assert sensitivity == pytest.approx(figures["sensitivity"], abs=1e-3)
        assert specificity == pytest.approx(figures["specificity"], abs=1e-3)
        # A floor well above the SARTAJ-only baseline (sensitivity 0.25-0.68, specificity
        # 0.34-0.66 by sequence), not the 0.95 / 0.90 target, which is not met yet.
        assert sensitivity >= 0.6 and specificity >= 0.6


def test_no_test_image_has_a_near_duplicate_in_training(shipped):
    _, data = shipped
    manifest = _manifest()
    raw = json.loads(MODEL.with_suffix(".splits.json").read_text())
    index = {path: i for i, path in enumerate(data.paths)}
    sartaj = [i for i, c in enumerate(data.collections) if c == "sartaj"]
    groups = dict(zip(sartaj, dedup.group_near_duplicates(data.hashes[sartaj],
                                                          raw["group_distance"]).tolist()))
    splits = {name: {groups[index[p]] for p in paths if p.startswith("sartaj/")}
              for name, paths in manifest.items()}
    assert not splits["test"] & (splits["train"] | splits["val"])
    assert not splits["val"] & splits["train"]
    # And nothing from the official Testing folder was trained on.
    trained = set(manifest["train"]) | set(manifest["val"])
    assert not any(path.startswith("sartaj/Testing/") for path in trained)


def test_no_lgg_patient_is_on_both_sides(shipped):
    _, data = shipped
    index = {path: i for i, path in enumerate(data.paths)}
    patients = {name: {data.patients[index[p]] for p in paths if p.startswith("lgg/")}
                for name, paths in _manifest().items()}
    assert patients["test"] and patients["train"]
    assert not patients["test"] & (patients["train"] | patients["val"])
    assert not patients["val"] & patients["train"]


def test_every_reported_figure_reproduces(shipped):
    """reports/metrics.json, recomputed: each evaluation set's accuracy, per-class figures,
    AUCs, confusion matrix, ECE, any-tumour and per-sequence figures, exactly as recorded."""
    from brainmri.training.evaluation import by_sequence
    from brainmri.training.evaluation import eval_sets
    from brainmri.training.evaluation import predict_canonical
    from brainmri.training.metrics import binary_metrics
    from brainmri.training.metrics import classification_metrics

    predictor, data = shipped
    report = json.loads((MODEL.parents[1] / "reports" / "metrics.json").read_text())
    assert report["model"]["sha256"] == predictor.card.sha256
    sets = [s for s in eval_sets(data, json.loads(MODEL.with_suffix(".splits.json").read_text()))
            if len(s.indices)]
    assert sorted(s.name for s in sets) == sorted(report["sets"])
    for eval_set in sets:
        probs = predictor.calibrate(predict_canonical(predictor, data.images[eval_set.indices]))
        truth = data.label_indices[eval_set.indices]
        recorded = report["sets"][eval_set.name]
        figures = classification_metrics(truth, probs)
        assert figures == {key: recorded[key] for key in figures}, eval_set.name
        assert binary_metrics(truth, probs) == recorded["tumor_vs_no_tumor"], eval_set.name
        sequences = [data.sequences[i] for i in eval_set.indices]
        assert by_sequence(truth, probs, sequences) == recorded["by_sequence"], eval_set.name

def test_shipped_model_serves_a_real_jpeg_through_the_api(shipped):
    from brainmri import create_app

    predictor, _ = shipped
    # Pinned: the registry's default is whichever model has the best held-out figures (now
    # EfficientNet-Lite0), and this test is about the CNN.
    app = create_app({"TESTING": True, "SECRET_KEY": "test", "BRAINMRI_DEFAULT_MODEL": "brainmri_cnn"})
    app.extensions["brainmri.predictor"] = predictor
    jpeg = sorted((DATA / "Testing" / "pituitary_tumor").glob("*.jpg"))[0]
    with jpeg.open("rb") as handle:
        response = app.test_client().post("/api/v1/predict", data={"file": (handle, "x.jpg")})
    assert response.status_code == 200
    body = response.get_json()
    assert list(body["probabilities"]) == list(CLASSES)
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert body["model"]["sha256"] == predictor.card.sha256
