"""The guard network: a Keras model for one question only, is this a brain MRI slice at all?

The classifier's own features were trained to tell four diagnoses apart, not brain MRI from
head CT, a knee or an abdomen; a linear head on them (`ood.Exposure`) refused only about a
quarter of held-out head CT. The guard network sees the preprocessed input (the same 128-px head
crop the classifier sees, shrunk to 64 px) and answers with a logit and the features under it.
The shipped one is EfficientNet-Lite0's frozen ImageNet layers with a logistic head fitted on
brain MRI slices of every collection and sequence against real images that are not brain MRI
(`ood_train/`) and altered copies of brain slices (`training/guard_trunk.py`); `build_guardnet`
is the small CNN trained from scratch that it replaced (`train-guard --network cnn`). This module
serves either: it needs only a model whose last layer is the logit and whose `EMBEDDING_LAYER`
gives the features.

Two scores come out of it. The logit ("brain_likeness") answers "brain slice or one of the kinds
of image it was taught to refuse?", and so generalises best to kinds like those. The second
("brain_distance") needs no negative at all: how far the features (`EMBEDDING_LAYER`) lie from
the training brain slices', so it can refuse a new kind that the features tell apart from every
brain slice. The shipped guard measures it to the nearest of 1,024 cluster centres of those
slices (`PrototypeFit`); the CNN recipe to one Gaussian fitted on them (`GaussianFit`).

It depends on no classifier, so one guard network serves every model; `brainmri train-guard`
(`training/guard_training.py`) writes it to `model/guard/brainmri_guard.h5`, its ONNX copy and
its metadata (bounds, held-out figures) beside it; `brainmri calibrate` links it into each
model's guard.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import ood

__all__ = ["EMBEDDING_LAYER", "GUARD_FORMAT", "GUARD_SIDE", "GaussianFit", "GuardNet",
           "PrototypeFit", "build_guardnet",
           "embedding_from_metadata", "embedding_to_metadata", "shrink"]

GUARD_SIDE = 64
GUARD_FORMAT = "brainmri-guard/1"
EMBEDDING_LAYER = "pool"  # the pooled features that "brain_distance" is measured in


def shrink(images: np.ndarray, side: int = GUARD_SIDE) -> np.ndarray:
    """(N, S, S, 1) inputs averaged down to (N, side, side, 1), keeping the dtype.

    Block averaging (what cv2.INTER_AREA does for an integer factor): the guard needs layout,
    intensity and texture, not detail, and a 64-px input costs a quarter of a 128-px one.
    """
    images = np.asarray(images)
    n, size = images.shape[0], images.shape[1]
    if size == side:
        return images
    if size % side:
        raise ValueError(f"input side {size} is not a multiple of the guard's {side}")
    k = size // side
    blocks = images.reshape(n, side, k, side, k, -1).astype(np.float32).mean(axis=(2, 4))
    return np.rint(blocks).astype(np.uint8) if images.dtype == np.uint8 else blocks


def build_guardnet(side: int = GUARD_SIDE, width: int = 16):
    """Four conv stages (two 3×3 convolutions each) on a `side`-px grey input; one logit."""
    import keras

    inputs = keras.Input((side, side, 1), name="image")
    x = inputs
    for stage, filters in enumerate((width, 2 * width, 4 * width, 8 * width)):
        for k in range(2):
            x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False,
                                    name=f"conv{stage}_{k}")(x)
            x = keras.layers.BatchNormalization(name=f"bn{stage}_{k}")(x)
            x = keras.layers.ReLU(name=f"relu{stage}_{k}")(x)
        x = keras.layers.MaxPooling2D(name=f"pool{stage}")(x)
    x = keras.layers.GlobalAveragePooling2D(name=EMBEDDING_LAYER)(x)
    x = keras.layers.Dropout(0.3, name="dropout")(x)
    outputs = keras.layers.Dense(1, name="brain_logit")(x)
    return keras.Model(inputs, outputs, name="brainmri_guard")


def _with_embedding(model):
    """The Keras model with its pooled features as a second output (None: it has no such layer)."""
    import keras

    try:
        layer = model.get_layer(EMBEDDING_LAYER)
    except ValueError:
        return None
    return keras.Model(model.input, [model.output, layer.output])


def write_onnx(model, path: Path) -> str:
    """The network as ONNX beside its .h5, checked against Keras; returns the file's sha256.

    Its outputs are the logit and the pooled features (for "brain_distance"). The served app
    runs it in onnxruntime so that a worker needs no TensorFlow (about 0.2 ms for one 64-px
    input); the check refuses a conversion that moves any logit, or any pooled feature
    relative to the largest, by 1e-3.

    Raises:
        ValueError: the ONNX outputs differ from Keras'.
    """
    import hashlib

    import tensorflow as tf
    import tf2onnx

    side = model.input_shape[1]
    both = _with_embedding(model)
    spec = [tf.TensorSpec((None, side, side, 1), tf.float32, name="image")]
    if both is None:
        serve = tf.function(lambda x: {"brain_logit": model(x, training=False)},
                            input_signature=spec, autograph=False)
    else:
        def outputs(x):
            logit, embedding = both(x, training=False)
            return {"brain_logit": logit, "embedding": embedding}

        serve = tf.function(outputs, input_signature=spec, autograph=False)
    tf2onnx.convert.from_function(serve, input_signature=spec, opset=17, output_path=str(path))
    probe = np.random.default_rng(3).random((8, side, side, 1), dtype=np.float32)
    probe[0], probe[1] = 0.0, 1.0
    expected = serve(tf.constant(probe))
    got_logits, got_embeddings = _onnx_function(path)(probe)
    error = float(np.abs(got_logits - np.asarray(expected["brain_logit"])[:, 0]).max())
    if both is not None:
        want = np.asarray(expected["embedding"])
        error = max(error, float(np.abs(got_embeddings - want).max()
                                 / max(1.0, float(np.abs(want).max()))))
    if error > 1e-3:
        path.unlink()
        raise ValueError(f"ONNX guard outputs differ from Keras' by {error:.2e}")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _onnx_session(path: Path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1  # small inputs, beside the model's own threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _onnx_function(path: Path, session=None):
    """(logits (N,), pooled features (N, C) or None for a file that has only the logit)."""
    session = session or _onnx_session(path)
    name = session.get_inputs()[0].name
    # The logit is the (N, 1) output, the features the (N, C > 1) one (names are tf2onnx's).
    outputs = sorted(session.get_outputs(), key=lambda output: output.shape[-1] != 1)
    names = [output.name for output in outputs]

    def run(batch):
        got = session.run(names, {name: np.asarray(batch, np.float32)})
        return got[0][:, 0], (got[1] if len(got) > 1 else None)

    return run


@dataclass(frozen=True)
class GaussianFit:
    """"brain_distance" as the squared Mahalanobis distance to one Gaussian (`ood.fit_gaussian`)."""

    mean: np.ndarray
    whitening: np.ndarray

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Per row, per dimension (`ood.gaussian_distance`)."""
        return ood.gaussian_distance(features, self.mean, self.whitening)

    def to_metadata(self) -> dict[str, Any]:
        """JSON form (the mean, and the whitening as float32 base64)."""
        return {"kind": "gaussian", **ood.gaussian_to_metadata(self.mean, self.whitening)}


@dataclass(frozen=True)
class PrototypeFit:
    """"brain_distance" as the squared distance to the nearest of the training slices' cluster
    centres (`ood.fit_prototypes`), in the standardised features."""

    prototypes: np.ndarray  # (K, dims)

    def __post_init__(self) -> None:
        # Once, not per upload: summing 1,024 × 464 squares took 1 ms of a 1.1 ms distance.
        prototypes = np.asarray(self.prototypes, np.float64)
        object.__setattr__(self, "prototypes", prototypes)
        object.__setattr__(self, "_squared_norms", (prototypes**2).sum(1))

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Per row, per dimension (`ood.prototype_distance`)."""
        return ood.prototype_distance(features, self.prototypes, self._squared_norms)

    def to_metadata(self) -> dict[str, Any]:
        """JSON form: the prototypes as float32 base64, row-major."""
        k, dims = self.prototypes.shape
        return {"kind": "prototypes", "prototypes": k, "dims": dims,
                "prototypes_float32_base64": base64.b64encode(
                    np.asarray(self.prototypes).astype("<f4").tobytes()).decode("ascii")}


def embedding_to_metadata(fit: GaussianFit | PrototypeFit, bound: float,
                          **info: Any) -> dict[str, Any]:
    """JSON form of the "brain_distance" fit, stored under "embedding" in the guard metadata."""
    return {"layer": EMBEDDING_LAYER, "bound": round(float(bound), 6), **fit.to_metadata(),
            **info}


def embedding_from_metadata(meta: Mapping[str, Any]) -> GaussianFit | PrototypeFit:
    """The "brain_distance" fit from `embedding_to_metadata`'s form (no "kind": a Gaussian, as
    every guard written before prototypes).

    Raises:
        ValueError: an unknown kind.
    """
    kind = meta.get("kind", "gaussian")
    if kind == "gaussian":
        return GaussianFit(*ood.gaussian_from_metadata(meta))
    if kind == "prototypes":
        flat = np.frombuffer(base64.b64decode(meta["prototypes_float32_base64"]), "<f4")
        return PrototypeFit(flat.reshape(int(meta["prototypes"]), int(meta["dims"]))
                            .astype(np.float64))
    raise ValueError(f"unknown brain_distance fit {kind!r} in the guard metadata")


class GuardNet:
    """The trained guard network's forward pass: a logit and pooled features per input.

    Built from a Keras model (training, tools) or from its ONNX copy (`GuardNet.load` prefers
    it when onnxruntime is installed and the file matches its recorded sha256). With an
    `embedding` fit of the training slices' pooled features (`GaussianFit` or `PrototypeFit`),
    `scores` adds "brain_distance" to "brain_likeness".
    """

    def __init__(self, model=None, onnx_path: Path | None = None,
                 embedding: GaussianFit | PrototypeFit | None = None) -> None:
        import threading

        self._lock = threading.Lock()  # one call at a time, as the predictor does
        self.model = model
        self.embedding = embedding
        if onnx_path is not None:
            session = _onnx_session(onnx_path)
            self.side = int(session.get_inputs()[0].shape[1])
            self._fn = _onnx_function(onnx_path, session)
            self.engine = "onnx"
            return
        import tensorflow as tf

        self.side = int(model.input_shape[1])
        both = _with_embedding(model) or model
        # autograph=False: nothing to convert, and no generated files left in the temp folder.
        traced = tf.function(lambda x: both(x, training=False),
                             input_signature=[tf.TensorSpec((None, self.side, self.side, 1),
                                                            tf.float32)],
                             autograph=False)

        def run(batch):
            out = traced(batch)
            if isinstance(out, (list, tuple)):
                return np.asarray(out[0])[:, 0], np.asarray(out[1])
            return np.asarray(out)[:, 0], None

        self._fn = run
        self.engine = "keras"
        self._fn(np.zeros((1, self.side, self.side, 1), np.float32))  # trace and allocate now

    @classmethod
    def load(cls, path: Path, onnx_sha256: str | None = None,
             sha256: str | None = None) -> GuardNet:
        """Load a guard network saved by `brainmri train-guard` (its ONNX copy when usable),
        with the "brain_distance" fit its metadata (`<path>.json`) holds for this very file;
        `sha256` is the .h5's when the caller has already checked it (no second hashing)."""
        import hashlib
        import importlib.util
        import json

        path = Path(path)
        embedding = None
        meta_path = path.with_suffix(".json")
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            # The fit belongs to one network: never pair it with another file's features.
            if "embedding" in meta and meta.get("sha256") == (
                    sha256 or hashlib.sha256(path.read_bytes()).hexdigest()):
                embedding = embedding_from_metadata(meta["embedding"])
        onnx = path.with_suffix(".onnx")
        if (onnx_sha256 and onnx.is_file() and importlib.util.find_spec("onnxruntime")
                and hashlib.sha256(onnx.read_bytes()).hexdigest() == onnx_sha256):
            return cls(onnx_path=onnx, embedding=embedding)
        import keras

        return cls(keras.models.load_model(path, compile=False), embedding=embedding)

    def measure(self, images: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits (N,) and pooled features (N, C), or None for a network without them, per
        preprocessed input (any multiple of the guard's side); floats in [0, 1] or uint8."""
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        images = shrink(images, self.side)
        if images.dtype == np.uint8:
            images = images.astype(np.float32) / 255.0
        logits, features = [], []
        with self._lock:
            for i in range(0, len(images), batch):
                logit, feature = self._fn(images[i:i + batch].astype(np.float32))
                logits.append(np.asarray(logit, np.float32))
                features.append(feature)
        if not logits:
            return np.zeros(0, np.float32), None
        return (np.concatenate(logits),
                None if features[0] is None else np.concatenate(features).astype(np.float32))

    def logits(self, images: np.ndarray, batch: int = 256) -> np.ndarray:
        """"Brain MRI slice" logit per preprocessed input (as `measure`)."""
        return self.measure(images, batch)[0]

    def distances(self, features: np.ndarray) -> np.ndarray:
        """"brain_distance" of pooled features to the training slices, per dimension (the
        `embedding` fit's)."""
        if self.embedding is None:
            raise ValueError("this guard network has no fitted embedding (brainmri train-guard)")
        return self.embedding.distance(features)

    def scores(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """{"brain_likeness": logits, "brain_distance": distances (when fitted)}, one forward pass."""
        logits, features = self.measure(images)
        if self.embedding is None or features is None:
            return {"brain_likeness": logits}
        return {"brain_likeness": logits, "brain_distance": self.distances(features)}
