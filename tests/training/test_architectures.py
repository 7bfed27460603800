"""Every `--arch` builds, trains a step, saves to .h5 and serves through the real Predictor (slow)."""

from __future__ import annotations

import numpy as np
import pytest

from brainmri.training.architectures import ARCHITECTURES
from brainmri.training.architectures import build
from brainmri.training.architectures import check_weights
from brainmri.inference import CLASSES
from brainmri.inference import write_model_card
from brainmri.inference import Predictor

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]

SIZE = 64  # small, to keep CI quick; every architecture accepts it


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architecture_trains_saves_and_serves(name, tmp_path):
    """One training step on synthetic data, .h5 round trip, same outputs through the predictor."""
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    model = build(name, size=SIZE)
    arch = ARCHITECTURES[name]
    assert model.input_shape == (None, SIZE, SIZE, 1)
    assert model.output_shape == (None, len(CLASSES))
    assert len(model.get_layer(arch.last_conv_layer).output.shape) == 4  # Grad-CAM needs a map
    bn = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert bn and all(layer.momentum == 0.9 for layer in bn)

    rng = np.random.default_rng(0)
    x = rng.random((8, SIZE, SIZE, 1), dtype=np.float32)
    y = rng.integers(0, len(CLASSES), 8)
    model.compile(keras.optimizers.AdamW(1e-3), "sparse_categorical_crossentropy")
    before = [w.copy() for w in model.get_weights()]
    loss = model.train_on_batch(x, y)
    assert np.isfinite(loss)
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))

    path = tmp_path / f"brainmri_{name}.h5"
    model.save(path)
    write_model_card(path, {"name": path.stem, "version": "0", "arch": name,
                            "classes": list(CLASSES), "input": {"size": SIZE, "channels": 1},
                            "last_conv_layer": arch.last_conv_layer})
    predictor = Predictor.from_path(path)
    predictor.load()
    expected = model.predict(x[:2], verbose=0)
    np.testing.assert_allclose(predictor.predict_arrays(x[:2]), expected, atol=1e-5)
    assert predictor.conv_layer == arch.last_conv_layer
    heatmap = predictor.explain(x[0]).heatmap
    assert heatmap.shape == (SIZE, SIZE) and np.isfinite(heatmap).all()


def test_weights_are_checked_per_architecture(tmp_path):
    """Each architecture accepts only the weights it can use; a local file is always allowed."""
    assert check_weights("cnn", None).name == "cnn"
    assert check_weights("efficientnet_lite0", "imagenet-lite0").name == "efficientnet_lite0"
    with pytest.raises(ValueError, match="cnn accepts --weights none"):
        check_weights("cnn", "imagenet")
    with pytest.raises(ValueError, match="choose one of cnn, mobilenetv2"):
        check_weights("resnet", None)
    local = tmp_path / "mine.weights.h5"
    local.write_bytes(b"x")
    assert check_weights("mobilenetv2", str(local)).name == "mobilenetv2"
