"""The ONNX engine against the Keras one: same softmax, features and Grad-CAM; cache checks (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from brainmri.config import PROJECT_ROOT
from brainmri.inference import CLASSES
from brainmri.inference import ModelError
from brainmri.inference import Predictor
from brainmri.inference import onnxengine
from brainmri.inference import read_model_card
from brainmri.inference import write_model_card

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]


def _save(model, folder: Path, name: str) -> Path:
    path = folder / f"{name}.h5"
    model.save(path)
    write_model_card(path, {"name": name, "version": "0.0.1", "classes": list(CLASSES),
                            "input": {"size": 32, "channels": 1}})
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A CAM-style tiny CNN (conv -> GAP -> dropout -> softmax) and one with a hidden Dense."""
    keras = pytest.importorskip("keras")
    from keras import layers

    folder = tmp_path_factory.mktemp("onnx-models")
    keras.utils.set_random_seed(3)
    cam = keras.Sequential([keras.Input((32, 32, 1)), layers.Conv2D(6, 3, activation="relu"),
                            layers.MaxPooling2D(), layers.Conv2D(8, 3, activation="relu"),
                            layers.GlobalAveragePooling2D(), layers.Dropout(0.2),
                            layers.Dense(len(CLASSES), activation="softmax")])
    hidden = keras.Sequential([keras.Input((32, 32, 1)), layers.Conv2D(4, 3, activation="relu"),
                               layers.GlobalAveragePooling2D(), layers.Dense(8, activation="relu"),
                               layers.Dense(len(CLASSES), activation="softmax")])
    return _save(cam, folder, "cam"), _save(hidden, folder, "hidden")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("BRAINMRI_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _probe(n: int = 5, size: int = 32) -> np.ndarray:
    batch = np.random.default_rng(11).random((n, size, size, 1), dtype=np.float32)
    batch[0] = 0.0
    return batch


def test_onnx_engine_agrees_with_keras(models, cache):
    """Softmax, pooled features and Grad-CAM (every class) match the Keras engine's."""
    path = models[0]
    record = onnxengine.build_cache(read_model_card(path))
    assert Path(record["folder"]).parent == cache and record["max_difference"] < 1e-4
    onnx = Predictor.from_path(path, engine="onnx")
    keras_engine = Predictor.from_path(path, engine="keras")
    onnx.load()
    keras_engine.load()
    assert (onnx.engine, keras_engine.engine) == ("onnx", "keras")
    assert onnx.conv_layer == keras_engine.conv_layer
    batch = _probe()
    (p1, f1), (p2, f2) = onnx.forward(batch), keras_engine.forward(batch)
    np.testing.assert_allclose(p1, p2, atol=1e-5)
    np.testing.assert_allclose(f1, f2, atol=1e-5 * max(1.0, float(np.abs(f2).max())))
    for k in range(len(CLASSES)):
        index = np.full(len(batch), k)
        np.testing.assert_allclose(onnx.gradcam_batch(batch, index),
                                   keras_engine.gradcam_batch(batch, index), atol=1e-4)
    one = onnx.explain(batch[1])
    assert one.label == keras_engine.explain(batch[1]).label
    assert one.heatmap.shape == (32, 32) and float(one.heatmap.max()) == pytest.approx(1.0)
    assert onnx.predict(batch[1]).probabilities == pytest.approx(
        keras_engine.predict(batch[1]).probabilities, abs=1e-5)


def test_auto_uses_the_cache_only_when_it_checks_out(models, cache):
    """auto: Keras without a cache; ONNX with one; Keras again once any cache file is altered."""
    path = models[0]
    card = read_model_card(path)
    fresh = lambda: Predictor.from_path(path, engine="auto")  # noqa: E731
    first = fresh()
    first.load()
    assert first.engine == "keras"
    onnxengine.build_cache(card)
    second = fresh()
    second.load()
    assert second.engine == "onnx"
    folder = onnxengine.cache_folder(card)
    onnx_file = folder / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")
    assert onnxengine.read_cache(card) is None
    third = fresh()
    third.load()
    assert third.engine == "keras"
    # A record from another engine format (or another .h5) is not trusted either.
    onnxengine.build_cache(card)
    record = json.loads((folder / "engine.json").read_text())
    (folder / "engine.json").write_text(json.dumps({**record, "format": "brainmri-onnx/0"}))
    assert onnxengine.read_cache(card) is None


def test_onnx_engine_required_but_missing_is_an_error(models, cache):
    """BRAINMRI_ENGINE=onnx without a valid cache refuses to load, saying how to build one."""
    with pytest.raises(ModelError, match="build-cache"):
        Predictor.from_path(models[0], engine="onnx").load()


def test_an_unsupported_head_stays_on_keras(models, cache):
    """A hidden Dense after the pooling: Grad-CAM is not the kernel column, so no ONNX copy."""
    with pytest.raises(onnxengine.OnnxUnsupported, match="Keras engine"):
        onnxengine.build_cache(read_model_card(models[1]))
    predictor = Predictor.from_path(models[1], engine="auto")
    predictor.load()
    assert predictor.engine == "keras"


def test_engine_choice_is_checked(monkeypatch):
    """A misspelt BRAINMRI_ENGINE is an error that lists the choices."""
    from brainmri.inference import engine_choice

    monkeypatch.setenv("BRAINMRI_ENGINE", "tensorrt")
    with pytest.raises(ModelError, match="auto, onnx, keras"):
        engine_choice()


def test_a_worker_serving_from_the_cache_never_imports_tensorflow(models, cache):
    """main.py (what a gunicorn worker runs) with a built cache: ready, TensorFlow not imported."""
    path = models[0]
    onnxengine.build_cache(read_model_card(path))
    code = ("import sys, main; r = main.app.extensions['brainmri.models'];"
            "print(r.ready, r.get().engine, 'tensorflow' in sys.modules, 'keras' in sys.modules)")
    env = {**os.environ, "FLASK_BRAINMRI_MODEL_PATH": json.dumps(str(path)),
           "BRAINMRI_CACHE_DIR": str(cache)}
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-4:] == ["True", "onnx", "False", "False"], out.stdout


def test_shipped_default_model_is_served_alike_by_both_engines(cache):
    """The shipped CNN: its ONNX copy's softmax and Grad-CAM match Keras on real-looking input."""
    from brainmri.inference import default_model_path

    path = default_model_path(PROJECT_ROOT / "model")
    card = read_model_card(path)
    onnxengine.build_cache(card)
    onnx = Predictor(card, engine="onnx")
    keras_engine = Predictor(card, engine="keras")
    from conftest import synthetic_slice
    from brainmri.imaging import load_scan
    from conftest import encode

    batch = np.stack([load_scan(encode(synthetic_slice(seed=s)), card.input_size)
                      for s in range(4)])
    np.testing.assert_allclose(onnx.forward(batch)[0], keras_engine.forward(batch)[0], atol=1e-5)
    index = np.argmax(keras_engine.forward(batch)[0], axis=1)
    np.testing.assert_allclose(onnx.gradcam_batch(batch, index),
                               keras_engine.gradcam_batch(batch, index), atol=1e-4)


def test_preflight_builds_missing_caches_once(models, cache):
    """gunicorn's pre-flight converts each served model once; the next start finds the cache.

    A model the ONNX engine cannot serve is logged and left to Keras, not a reason to stop.
    """
    def preflight(path: Path) -> subprocess.CompletedProcess:
        env = {**os.environ, "FLASK_BRAINMRI_MODEL_PATH": json.dumps(str(path)),
               "BRAINMRI_CACHE_DIR": str(cache)}
        return subprocess.run([sys.executable, "-m", "brainmri.preflight"], cwd=PROJECT_ROOT,
                              env=env, capture_output=True, text=True, timeout=300)

    first = preflight(models[0])
    assert first.returncode == 0, first.stderr[-2000:]
    assert "building the ONNX cache for cam.h5" in first.stderr
    assert onnxengine.read_cache(read_model_card(models[0])) is not None
    again = preflight(models[0])
    assert again.returncode == 0 and "building" not in again.stderr, again.stderr[-2000:]
    hidden = preflight(models[1])
    assert hidden.returncode == 0, hidden.stderr[-2000:]
    assert "hidden.h5 is served by the Keras engine" in hidden.stderr


def test_build_cache_reports_a_cache_folder_it_cannot_write(models, tmp_path, monkeypatch):
    """`brainmri build-cache` into a folder that cannot be made: a clear error, no traceback."""
    from click.testing import CliRunner

    from brainmri.cli import cli

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("BRAINMRI_CACHE_DIR", str(blocker))  # mkdir under it fails
    monkeypatch.setenv("FLASK_BRAINMRI_MODEL_PATH", json.dumps(str(models[0])))
    result = CliRunner().invoke(cli, ["build-cache"])
    assert result.exit_code == 1, result.output
    assert f"the ONNX cache folder {blocker} cannot be written" in result.output
    assert "BRAINMRI_CACHE_DIR" in result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, OSError)


def test_loading_on_keras_leaves_no_autograph_files(models, cache):
    """The Keras engine's traced functions are not autograph-converted: nothing left in /tmp.

    Autograph wrote about ten ``__autograph_generated_file*.py`` files per worker start and
    never removed them; with max_requests recycling they piled up.
    """
    import tempfile

    def generated() -> set[str]:
        return {name for name in os.listdir(tempfile.gettempdir())
                if name.startswith("__autograph_generated_file")}

    before = generated()
    predictor = Predictor.from_path(models[0], engine="keras")
    predictor.load()
    predictor.explain(_probe(1)[0])
    assert generated() - before == set()
