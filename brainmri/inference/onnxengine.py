"""The served forward pass in onnxruntime, from an ONNX copy of each .h5 cached on disk.

A gunicorn worker that imports TensorFlow costs about 800 MiB of RSS and 10-20 s to start (import,
.h5 load, three traced functions, warm-ups). onnxruntime runs the same network in a fraction of
both, so workers serve from an ONNX copy and never import TensorFlow:

* `build_cache` (TensorFlow + tf2onnx) converts one model into a cache folder named after the
  .h5's sha256: ``model.onnx`` (outputs: softmax and the explained layer's activations) and
  ``head.npz`` (the softmax layer's kernel), checked against Keras on a fixed probe batch. The
  gunicorn master builds missing caches once, before it forks (`brainmri.preflight`), and
  operators can bake them into an image with ``brainmri build-cache``.
* `OnnxEngine` (onnxruntime + NumPy) serves softmax, pooled features and Grad-CAM from it.

Grad-CAM without gradients: both shipped models end in explained layer -> global average pool ->
dropout -> softmax Dense. For that head the gradient of class k's logit with respect to the
activation A[i, j, c] is kernel[c, k] / (H * W) everywhere, so Grad-CAM's channel weights are
the kernel column and the map is relu(sum_c kernel[c, k] * A[..., c]) up to a positive factor
that the peak normalisation removes: Class Activation Mapping, exactly. Models with any other
head are served by the Keras engine instead (`build_cache` raises OnnxUnsupported).

The cache is trusted only when its record names the .h5's sha256, the current ENGINE_FORMAT and
the sha256 of every file in it; anything else is rebuilt (or, in a worker, served by Keras).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .modelcard import ModelCard
from .modelcard import ModelError
from .modelcard import read_keras_model

__all__ = [
    "ENGINE_FORMAT",
    "OnnxEngine",
    "OnnxUnsupported",
    "build_cache",
    "cache_dir",
    "cache_folder",
    "onnx_available",
    "read_cache",
]

# Bumped whenever what the cache holds or how it is checked changes: older caches are rebuilt.
ENGINE_FORMAT = "brainmri-onnx/1"
RECORD = "engine.json"
# Largest |ONNX - Keras| difference accepted on the probe batch (softmax and activations).
TOLERANCE = 1e-4


class OnnxUnsupported(ModelError):
    """The model loads in Keras but the ONNX engine cannot serve it (head, or a failed check)."""


def onnx_available() -> bool:
    """True when onnxruntime can be imported (the served engine's one requirement)."""
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def cache_dir() -> Path:
    """BRAINMRI_CACHE_DIR, else $XDG_CACHE_HOME/brainmri, else ~/.cache/brainmri.

    Outside the model folder, which may be read-only in a container.
    """
    explicit = os.environ.get("BRAINMRI_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "brainmri"


def cache_folder(card: ModelCard, root: Path | None = None) -> Path:
    """Where `card`'s ONNX copy lives: named after the model and its .h5's sha256."""
    return Path(root or cache_dir()) / f"{card.model_path.stem}-{card.sha256[:16]}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_cache(card: ModelCard, root: Path | None = None) -> dict | None:
    """The cache record for `card` when every file in it checks out, else None (no TensorFlow)."""
    folder = cache_folder(card, root)
    try:
        record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("format") != ENGINE_FORMAT or record.get("h5_sha256") != card.sha256:
        return None
    files = record.get("files") or {}
    for name in ("model.onnx", "head.npz"):
        path = folder / name
        if name not in files or not path.is_file() or _sha256(path) != files[name]:
            return None
    return {**record, "folder": str(folder)}


def _explained_head(model, conv_name: str):
    """The softmax Dense layer when the layers after `conv_name` are GAP, dropout, Dense(softmax)."""
    import keras

    names = [layer.name for layer in model.layers]
    if conv_name not in names:
        return None
    after = model.layers[names.index(conv_name) + 1:]
    if not after or not isinstance(after[0], keras.layers.GlobalAveragePooling2D):
        return None
    *middle, head = after[1:] or [None]
    if not isinstance(head, keras.layers.Dense) or \
            getattr(head.activation, "__name__", "") != "softmax":
        return None
    if not all(isinstance(layer, keras.layers.Dropout) for layer in middle):
        return None
    return head


def build_cache(card: ModelCard, root: Path | None = None, model=None) -> dict:
    """Convert `card`'s .h5 to its ONNX cache (TensorFlow, tf2onnx), check it, return the record.

    Written into a temporary folder and renamed into place, so a worker never reads half a
    cache and two builders racing each other both end with a complete one.

    Raises:
        OnnxUnsupported: the model's head is not one the ONNX engine serves, or the ONNX
            outputs differ from Keras' by more than TOLERANCE (Keras serves it instead).
        ModelError: Keras cannot load the .h5, or it disagrees with its metadata.
    """
    import tensorflow as tf
    import tf2onnx

    from . import explain

    if model is None:
        model = read_keras_model(card)
    conv = explain.find_last_conv_layer(model, card.raw.get("last_conv_layer"))
    head = _explained_head(model, conv) if conv else None
    if head is None:
        raise OnnxUnsupported(f"{card.model_path.name}: the ONNX engine serves models whose explained "
                         "layer feeds global average pooling and a softmax Dense layer; this "
                         "one is served by the Keras engine.")
    shape = (card.input_size, card.input_size, card.channels)
    multi = explain.explained_model(model, conv, shape)
    spec = [tf.TensorSpec((None, *shape), tf.float32, name="image")]

    def outputs(x):
        activations, probs = multi(x, training=False)[:2]
        return {"probabilities": probs, "activations": activations}

    # autograph=False: nothing to convert, and no generated files left in the temp folder.
    serve = tf.function(outputs, input_signature=spec, autograph=False)
    final = cache_folder(card, root)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        tf2onnx.convert.from_function(serve, input_signature=spec, opset=17,
                                      output_path=str(work / "model.onnx"))
        kernel = np.asarray(head.kernel, np.float32)
        np.savez(work / "head.npz", kernel=kernel)
        probe = np.random.default_rng(7).random((6, *shape), dtype=np.float32)
        probe[0], probe[1] = 0.0, 1.0
        expected = serve(tf.constant(probe))  # Keras, through the function just converted
        probs, activations = (np.asarray(expected[key]) for key in ("probabilities",
                                                                    "activations"))
        engine = OnnxEngine(work, kernel, conv)
        got_probs, got_activations = engine.run(probe)
        error = max(float(np.abs(got_probs - probs).max()),
                    float(np.abs(got_activations - activations).max()
                          / max(1.0, float(np.abs(activations).max()))))
        if error > TOLERANCE:
            raise OnnxUnsupported(f"{card.model_path.name}: its ONNX copy differs from Keras by "
                             f"{error:.2e} (more than {TOLERANCE:g}); served by Keras instead.")
        record = {
            "format": ENGINE_FORMAT,
            "model": card.model_path.name,
            "h5_sha256": card.sha256,
            "explained_layer": conv,
            "max_difference": error,
            "tf2onnx": tf2onnx.__version__,
            "files": {name: _sha256(work / name) for name in ("model.onnx", "head.npz")},
        }
        (work / RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if final.exists():
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(work, final)
        except OSError:  # another builder got there first; its cache is as good as ours
            if read_cache(card, root) is None:
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {**record, "folder": str(final)}


def _session_threads() -> int:
    """The intra-op threads a worker may use: the same setting the TensorFlow engine reads."""
    for name in ("BRAINMRI_ONNX_THREADS", "TF_NUM_INTRAOP_THREADS"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 0  # onnxruntime's default: one per core


@dataclass
class OnnxEngine:
    """Softmax, pooled features and Grad-CAM for one model, from its ONNX cache folder."""

    folder: Path
    kernel: np.ndarray  # (channels, classes): the softmax layer's weights, for Grad-CAM
    explained_layer: str  # the layer whose activations the Grad-CAM maps are built from

    def __post_init__(self) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = _session_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: no graph-optimisation chatter in the logs
        self._session = onnxruntime.InferenceSession(
            str(Path(self.folder) / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        # Softmax is the rank-2 output, the activations the rank-4 one (names are tf2onnx's).
        ranked = {len(output.shape): output.name for output in self._session.get_outputs()}
        self._outputs = [ranked[2], ranked[4]]
        self._lock = threading.Lock()  # onnxruntime's run() is thread-safe; this keeps one
        # forward pass at a time per worker, as the Keras engine does, so threads queue
        # instead of splitting the cores between them.

    @classmethod
    def load(cls, card: ModelCard, root: Path | None = None) -> OnnxEngine | None:
        """The engine for `card` when its cache checks out (`read_cache`), else None."""
        record = read_cache(card, root)
        if record is None:
            return None
        folder = Path(record["folder"])
        with np.load(folder / "head.npz") as head:
            kernel = np.asarray(head["kernel"], np.float32)
        return cls(folder, kernel, str(record["explained_layer"]))

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Softmax (N, K) and the explained layer's activations (N, h, w, C)."""
        batch = np.ascontiguousarray(batch, np.float32)
        with self._lock:
            probs, activations = self._session.run(self._outputs, {self._input: batch})
        return probs, activations

    def forward(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Softmax (N, K) and the pooled activations (N, C), as `Predictor.forward` returns."""
        probs, activations = self.run(batch)
        return probs, activations.mean(axis=(1, 2))

    def gradcam(self, batch: np.ndarray, class_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Grad-CAM heatmaps (N, S, S) in [0, 1] for one class each, and the softmax (N, K)."""
        probs, activations = self.run(batch)
        weights = self.kernel[:, np.asarray(class_indices, np.int64)].T  # (N, C)
        cams = np.maximum(np.einsum("nhwc,nc->nhw", activations, weights), 0.0)
        side = batch.shape[1]
        out = np.zeros((len(cams), side, batch.shape[2]), np.float32)
        for i, cam in enumerate(cams):
            # Bilinear with half-pixel centres, as tf.image.resize in the Keras engine.
            up = cv2.resize(cam.astype(np.float32), (batch.shape[2], side),
                            interpolation=cv2.INTER_LINEAR)
            peak = float(up.max())
            out[i] = up / peak if peak > 0 else 0.0
        return out, probs
