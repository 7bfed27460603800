"""A small network trained for one question only: is this a brain MRI slice at all?

The classifier's own features were trained to tell four diagnoses apart, not brain MRI from
head CT, a knee or an abdomen; a linear head on them (`ood.Exposure`) refused only about a
quarter of held-out head CT. This network sees the preprocessed input (the same 128-px head crop
the classifier sees, shrunk to 64 px) and is trained on brain MRI slices of every collection and
sequence against real images that are not brain MRI (`ood_train/`: CT, X-ray, spine, knee and
body MRI, ultrasound, photos, documents, ...) and altered copies of brain slices (patches,
inversions, noise), all through the same augmentation as the classifier (`training.augment_batch`:
geometry, bias field, gamma, resolution, noise, JPEG), so that a new scanner's brain slice still
reads as brain while a new kind of body image does not.

It depends on no classifier, so one guard network serves every model; `brainmri train-guard`
(`guard_training.py`) writes it to `model/brainmri_guard.h5` and its metadata (bound, held-out
figures) beside it; `brainmri calibrate` links it into each model's guard.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["GUARD_FORMAT", "GUARD_SIDE", "GuardNet", "build_guardnet", "shrink"]

GUARD_SIDE = 64
GUARD_FORMAT = "brainmri-guard/1"


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
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(0.3, name="dropout")(x)
    outputs = keras.layers.Dense(1, name="brain_logit")(x)
    return keras.Model(inputs, outputs, name="brainmri_guard")


def write_onnx(model, path: Path) -> str:
    """The network as ONNX beside its .h5, checked against Keras; returns the file's sha256.

    The served app runs it in onnxruntime so that a worker needs no TensorFlow (about 0.2 ms
    for one 64-px input); the check refuses a conversion that moves any logit by 1e-3.

    Raises:
        ValueError: the ONNX logits differ from Keras'.
    """
    import hashlib

    import tensorflow as tf
    import tf2onnx

    side = model.input_shape[1]
    spec = [tf.TensorSpec((None, side, side, 1), tf.float32, name="image")]
    serve = tf.function(lambda x: {"brain_logit": model(x, training=False)},
                        input_signature=spec, autograph=False)
    tf2onnx.convert.from_function(serve, input_signature=spec, opset=17, output_path=str(path))
    probe = np.random.default_rng(3).random((8, side, side, 1), dtype=np.float32)
    probe[0], probe[1] = 0.0, 1.0
    expected = np.asarray(model(probe, training=False))[:, 0]
    got = _onnx_function(path)(probe)
    if not np.allclose(got, expected, atol=1e-3):
        path.unlink()
        raise ValueError(f"ONNX guard logits differ from Keras' by {np.abs(got - expected).max()}")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _onnx_session(path: Path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1  # small inputs, beside the model's own threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _onnx_function(path: Path, session=None):
    session = session or _onnx_session(path)
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: np.asarray(batch, np.float32)})[0][:, 0]


class GuardNet:
    """The trained guard network's forward pass: one logit per (N, S, S, 1) input.

    Built from a Keras model (training, tools) or from its ONNX copy (`GuardNet.load` prefers
    it when onnxruntime is installed and the file matches its recorded sha256).
    """

    def __init__(self, model=None, onnx_path: Path | None = None) -> None:
        import threading

        self._lock = threading.Lock()  # one call at a time, as the predictor does
        self.model = model
        if onnx_path is not None:
            session = _onnx_session(onnx_path)
            self.side = int(session.get_inputs()[0].shape[1])
            self._fn = _onnx_function(onnx_path, session)
            self.engine = "onnx"
            return
        import tensorflow as tf

        self.side = int(model.input_shape[1])
        # autograph=False: nothing to convert, and no generated files left in the temp folder.
        traced = tf.function(lambda x: model(x, training=False),
                             input_signature=[tf.TensorSpec((None, self.side, self.side, 1),
                                                            tf.float32)],
                             autograph=False)
        self._fn = lambda batch: np.asarray(traced(batch))[:, 0]
        self.engine = "keras"
        self._fn(np.zeros((1, self.side, self.side, 1), np.float32))  # trace and allocate now

    @classmethod
    def load(cls, path: Path, onnx_sha256: str | None = None) -> GuardNet:
        """Load a guard network saved by `brainmri train-guard` (its ONNX copy when usable)."""
        import hashlib
        import importlib.util

        path = Path(path)
        onnx = path.with_suffix(".onnx")
        if (onnx_sha256 and onnx.is_file() and importlib.util.find_spec("onnxruntime")
                and hashlib.sha256(onnx.read_bytes()).hexdigest() == onnx_sha256):
            return cls(onnx_path=onnx)
        import keras

        return cls(keras.models.load_model(path, compile=False))

    def logits(self, images: np.ndarray, batch: int = 256) -> np.ndarray:
        """"Brain MRI slice" logit per preprocessed input (any multiple of the guard's side);
        float inputs in [0, 1] or uint8."""
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        images = shrink(images, self.side)
        if images.dtype == np.uint8:
            images = images.astype(np.float32) / 255.0
        with self._lock:
            out = [np.asarray(self._fn(images[i:i + batch].astype(np.float32)), np.float32)
                   for i in range(0, len(images), batch)]
        return np.concatenate(out) if out else np.zeros(0, np.float32)

