"""The trust layer with real TensorFlow: Grad-CAM on a trained toy model, and the shipped guard."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from brainmri.config import DEFAULTS
from brainmri.inference import CLASSES
from brainmri.inference import write_model_card

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]

SIZE = 32
# The shipped CNN (the one tests/training/test_shipped_model.py checks).
MODEL = Path(DEFAULTS["BRAINMRI_MODEL_DIR"]) / "brainmri_cnn.h5"


def _blob_images(count: int, rng: np.random.Generator):
    """Dim noise; half of the images carry one bright 6×6 blob at a random place."""
    images = rng.uniform(0.0, 0.3, (count, SIZE, SIZE, 1)).astype(np.float32)
    labels = np.zeros(count, np.int64)
    for i in range(0, count, 2):
        y, x = rng.integers(2, SIZE - 8, 2)
        images[i, y : y + 6, x : x + 6] = 1.0
        labels[i] = 0  # "glioma" stands for "blob present"
        labels[i + 1] = CLASSES.index("no_tumor")
    return images, labels


@pytest.fixture(scope="module")
def blob_model(tmp_path_factory):
    """A small CNN trained to tell images with a bright blob from images without."""
    keras = pytest.importorskip("keras")
    from keras import layers

    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 1))
    x = layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = layers.Conv2D(16, 3, padding="same")(x)
    x = layers.ReLU(name="last_conv")(x)
    x = layers.GlobalMaxPooling2D()(x)
    outputs = layers.Dense(len(CLASSES), activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    images, labels = _blob_images(600, np.random.default_rng(0))
    model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(images, labels, epochs=12, batch_size=32, verbose=0)
    path = tmp_path_factory.mktemp("blob") / "blob.h5"
    model.save(path)
    write_model_card(path, {"name": "blob", "version": "0", "classes": list(CLASSES),
                            "input": {"size": SIZE, "channels": 1}, "last_conv_layer": "last_conv"})
    return path


def test_gradcam_highlights_the_planted_blob(blob_model):
    from brainmri.inference import Predictor

    predictor = Predictor.from_path(blob_model)
    rng = np.random.default_rng(5)
    hits = 0
    for _ in range(10):
        image = rng.uniform(0.0, 0.3, (SIZE, SIZE, 1)).astype(np.float32)
        y, x = rng.integers(2, SIZE - 8, 2)
        image[y : y + 6, x : x + 6] = 1.0
        assert predictor.predict(image).label == "glioma"
        explanation = predictor.explain(image)
        heatmap = explanation.heatmap
        assert heatmap.shape == (SIZE, SIZE)
        assert explanation.layer == "last_conv" and explanation.label == "glioma"
        assert 0.0 <= heatmap.min() and heatmap.max() == pytest.approx(1.0)
        inside = np.zeros((SIZE, SIZE), bool)
        inside[max(y - 2, 0) : y + 8, max(x - 2, 0) : x + 8] = True
        peak = np.unravel_index(np.argmax(heatmap), heatmap.shape)
        hits += bool(inside[peak] and heatmap[inside].mean() > 3 * heatmap[~inside].mean())
    assert hits >= 9


def test_served_probabilities_are_calibrated_and_sum_to_one(blob_model, tmp_path):
    from brainmri.inference import Predictor

    meta_path = blob_model.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    path = tmp_path / "blob.h5"
    path.write_bytes(blob_model.read_bytes())
    (tmp_path / "blob.json").write_text(json.dumps(meta | {"calibration": {"temperature": 2.5}}))
    hot = Predictor.from_path(path)
    plain = Predictor.from_path(blob_model)
    image, _ = _blob_images(2, np.random.default_rng(9))
    raw = plain.predict(image[0])
    calibrated = hot.predict(image[0])
    assert sum(calibrated.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
    assert calibrated.label == raw.label and calibrated.confidence < raw.confidence
    # The raw outputs are still available for evaluation.
    assert np.allclose(hot.predict_arrays(image[:1])[0], list(raw.probabilities.values()), atol=1e-6)


@pytest.mark.realdata
def test_shipped_guard_refuses_synthetic_images_and_passes_real_mris():
    from conftest import require_real_data

    from brainmri.training import ood_sets
    from brainmri.training import trust
    from brainmri.training.dataset import load_dataset
    from brainmri.inference import Predictor

    root = require_real_data()
    predictor = Predictor.from_path(MODEL)
    assert predictor.guard is not None, "run `brainmri calibrate` on the shipped model"
    predictor.load()
    for category in ood_sets.SYNTHETIC_CATEGORIES:
        for image in (i for i in ood_sets.synthetic_images() if i.category == category):
            scan = predictor.prepare_scan(image.data)
            _, embedding = predictor.forward(scan.model_input[None])
            assert predictor.guard.assess(scan.model_input, scan.colourfulness,
                                          embedding).refused, image.name
    from brainmri.training.splits import manifest_splits

    data = load_dataset(root, predictor.input_size)
    index = {path: i for i, path in enumerate(data.paths)}
    manifest = manifest_splits(json.loads(MODEL.with_suffix(".splits.json").read_text()))
    test = np.array([index[p] for p in manifest["test"] if p in index])
    assert len(test) > 300  # the SARTAJ part of the held-out test split
    _, embeddings, features, descriptors = trust._measure_set(
        predictor, data, test, network=predictor.guard.network)
    features.update(predictor.guard.model_scores(embeddings, features, descriptors))
    refused = [predictor.guard.check({k: v[i] for k, v in features.items()}).refused for i in range(len(test))]
    assert np.mean(refused) <= 0.02
