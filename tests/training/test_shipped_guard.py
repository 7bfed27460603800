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
from brainmri.inference import ood
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
        assert link["distance_bound"] == META["embedding"]["bound"]
        assert link["onnx_sha256"] == META["onnx_sha256"]
        # The rules that are not fitted are in force too (written by `brainmri calibrate`).
        bounds = json.loads(model.with_suffix(".json").read_text())["ood"]["bounds"]
        for name, pair in ood.FIXED_BOUNDS.items():
            assert tuple(bounds.get(name, ())) == pair, f"{model.name}: run `brainmri calibrate`"


def test_the_guard_never_trained_on_a_models_validation_or_test_slice():
    """Its positives are the training split of the manifest every shipped model shares."""
    manifests = {_sha(model.with_suffix(".splits.json")) for model in discover_models(MODEL_DIR)}
    assert manifests == {META["splits_sha256"]}


def test_the_held_out_report_covers_categories_and_brain_collections():
    held = META["held_out"]
    assert held["categories"] and held["collections"]
    # Every real category has its fold: no held-out figure is an in-sample (optimistic) one.
    assert not held.get("folds_not_run"), held.get("folds_not_run")
    distance_folds = set(held["categories"]) - set(held.get("distance_folds_not_run", []))
    for category, tally in held["categories"].items():
        names = [name for name in held["margins"] if name.startswith(category + "/")]
        assert len(names) == tally["images"]
        if category in distance_folds:  # refused when either margin of its fold is negative
            refused = sum(min(held["margins"][n], held["distance_margins"][n]) < 0 for n in names)
        else:
            refused = sum(held["margins"][n] < 0 for n in names)
        assert refused == tally["refused"], category


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
    scores = onnx.scores(data.images[val])
    on_keras = keras.scores(data.images[val[:64]])
    for name in ("brain_likeness", "brain_distance"):
        np.testing.assert_allclose(scores[name][:64], on_keras[name], atol=1e-3, rtol=1e-3)
    refused = ((scores["brain_likeness"] < META["bound"])
               | (scores["brain_distance"] > META["embedding"]["bound"]))
    for collection, rate in META["val_refusal_rate"].items():
        assert float(refused[collections == collection].mean()) == pytest.approx(rate, abs=0.002), \
            collection
