"""The shipped guard network: its files, what it was trained on, and the figures it records.

The file checks need nothing but the repository; the figures read SARTAJ and LGG from
../shared/data (or $BRAINMRI_DATA / $BRAINMRI_LGG_DATA), skipping with the reason when they are
missing, except under CI=true, where they fail.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from brainmri.config import DEFAULTS
from brainmri.imaging import PREPROCESSING_VERSION
from brainmri.inference import guardnet
from brainmri.inference.registry import discover_models
from brainmri.training.trust import GUARD_FILE

from conftest import require_lgg_data
from conftest import require_real_data

MODEL_DIR = Path(DEFAULTS["BRAINMRI_MODEL_DIR"])
GUARD = MODEL_DIR / GUARD_FILE
META = json.loads(GUARD.with_suffix(".json").read_text()) if GUARD.with_suffix(".json").is_file() else {}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_guard_files_are_the_ones_its_metadata_names():
    assert META, f"{GUARD.with_suffix('.json')} is missing"
    assert META["format"] == guardnet.GUARD_FORMAT
    assert META["preprocessing_version"] == PREPROCESSING_VERSION
    assert _sha(GUARD) == META["sha256"]
    assert _sha(GUARD.with_suffix(".onnx")) == META["onnx_sha256"]


def test_every_shipped_model_screens_with_this_guard_network():
    for model in discover_models(MODEL_DIR):
        link = json.loads(model.with_suffix(".json").read_text())["ood"].get("network")
        assert link, f"{model.name}'s guard has no network: run `brainmri calibrate`"
        assert (model.parent / link["file"]).resolve() == GUARD.resolve()
        assert link["sha256"] == META["sha256"] and link["bound"] == META["bound"]


def test_the_guard_never_trained_on_a_models_validation_or_test_slice():
    """Its positives are the training split of the manifest every shipped model shares."""
    manifests = {_sha(model.with_suffix(".splits.json")) for model in discover_models(MODEL_DIR)}
    assert manifests == {META["splits_sha256"]}


def test_the_held_out_report_covers_categories_and_brain_collections():
    held = META["held_out"]
    assert held["categories"] and held["collections"]
    # Every real category has its fold: no held-out figure is an in-sample (optimistic) one.
    assert not held.get("folds_not_run"), held.get("folds_not_run")
    for category, tally in held["categories"].items():
        margins = [m for name, m in held["margins"].items() if name.startswith(category + "/")]
        assert len(margins) == tally["images"]
        assert sum(m < 0 for m in margins) == tally["refused"]


@pytest.mark.slow
@pytest.mark.realdata
def test_validation_refusals_reproduce_and_onnx_agrees_with_keras():
    from brainmri.training.dataset import load_datasets
    from brainmri.training.trust import _split_indices

    data = load_datasets([require_real_data(), require_lgg_data()], 128)
    manifest = json.loads((MODEL_DIR / "brainmri_cnn.splits.json").read_text())
    val = _split_indices(data, manifest)["val"]
    collections = np.array(data.collections)[val]
    onnx = guardnet.GuardNet.load(GUARD, META["onnx_sha256"])
    keras = guardnet.GuardNet.load(GUARD)
    assert (onnx.engine, keras.engine) == ("onnx", "keras")
    logits = onnx.logits(data.images[val])
    np.testing.assert_allclose(logits[:64], keras.logits(data.images[val[:64]]), atol=1e-3)
    for collection, rate in META["val_refusal_rate"].items():
        refused = float((logits[collections == collection] < META["bound"]).mean())
        assert refused == pytest.approx(rate, abs=0.002), collection
