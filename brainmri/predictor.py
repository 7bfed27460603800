"""Wrap the saved Keras CNN (.h5) and return per-class softmax confidences with the disclaimer.

This and `training.py` are the only modules that import TensorFlow, and only when a model is
loaded, so the gunicorn master and the fast tests never pay for it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import asdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .imaging import DEFAULT_MAX_PIXELS
from .imaging import load_scan
from .modelcard import CLASSES
from .modelcard import ModelCard
from .modelcard import ModelError
from .modelcard import read_model_card

__all__ = ["DISCLAIMER", "Prediction", "Predictor", "get_predictor", "init_app"]

DISCLAIMER = (
    "For research and education only. This is not a medical device and not a diagnosis; "
    "a qualified clinician must review every scan."
)

EXTENSION_KEY = "brainmri.predictor"


@dataclass(frozen=True)
class Prediction:
    """One classified slice: every class's probability, in the canonical order."""

    label: str
    confidence: float
    probabilities: dict[str, float]
    tumor_probability: float
    disclaimer: str = DISCLAIMER

    @classmethod
    def from_probabilities(cls, probabilities: dict[str, float]) -> Prediction:
        """Build a prediction from a {class: probability} mapping covering every class."""
        ordered = {name: float(probabilities[name]) for name in CLASSES}
        label = max(ordered, key=ordered.get)
        return cls(
            label=label,
            confidence=ordered[label],
            probabilities=ordered,
            tumor_probability=1.0 - ordered["no_tumor"],
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (the API's body, minus the model block)."""
        return asdict(self)


def configure_tensorflow_threads() -> None:
    """Default TF to one inter-op thread and all cores intra-op unless the environment says.

    gunicorn.conf.py sets TF_NUM_INTRAOP_THREADS per worker so W workers × T threads ≈ cores;
    the variables must be in place before TensorFlow initialises (tensorflow#57812).
    """
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class Predictor:
    """Loads the CNN once per process and serialises calls into TensorFlow."""

    def __init__(self, card: ModelCard, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.card = card
        self.max_pixels = max_pixels
        self._model = None
        self._infer = None
        self._lock = threading.Lock()

    @classmethod
    def from_path(cls, model_path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Predictor:
        """Validate the model's metadata (cheap, no TensorFlow) and return an unloaded predictor.

        Raises:
            ModelError: missing model, missing/invalid metadata or sha256 mismatch.
        """
        return cls(read_model_card(Path(model_path)), max_pixels=max_pixels)

    @property
    def labels(self) -> tuple[str, ...]:
        """Class names in the model's output order."""
        return self.card.classes

    @property
    def input_size(self) -> int:
        """Side of the square input the model expects."""
        return self.card.input_size

    @property
    def ready(self) -> bool:
        """True once the model is loaded and warmed up."""
        return self._infer is not None

    def load(self) -> None:
        """Load the .h5 (compile=False), check it against its metadata and run a warm-up.

        Raises:
            ModelError: the file is not a loadable Keras model or disagrees with its metadata.
        """
        with self._lock:
            if self._infer is not None:
                return
            configure_tensorflow_threads()
            import keras
            import tensorflow as tf

            try:
                model = keras.saving.load_model(self.card.model_path, compile=False)
            except Exception as exc:  # h5py/keras raise many types for a bad file
                raise ModelError(
                    f"{self.card.model_path.name} could not be loaded as a Keras model "
                    f"({type(exc).__name__})."
                ) from exc
            outputs = model.output_shape[-1]
            if outputs != len(self.labels):
                raise ModelError(
                    f"{self.card.model_path.name} has {outputs} outputs but its metadata lists "
                    f"{len(self.labels)} classes."
                )
            expected = (self.input_size, self.input_size, self.card.channels)
            if tuple(model.input_shape[1:]) != expected:
                raise ModelError(
                    f"{self.card.model_path.name} takes inputs {model.input_shape[1:]} but its "
                    f"metadata says {expected}."
                )
            # A traced function with a fixed signature: no retracing, a few ms per call,
            # and no Model.predict() memory growth (tensorflow#33009).
            infer = tf.function(
                lambda x: model(x, training=False),
                input_signature=[tf.TensorSpec((None, *expected), tf.float32)],
                reduce_retracing=True,
            )
            infer(np.zeros((1, *expected), np.float32))  # warm-up: trace + allocate
            self._model = model
            self._infer = infer

    @property
    def keras_model(self):
        """The loaded Keras model (loads it on first use)."""
        self.load()
        return self._model

    def predict_arrays(self, images: np.ndarray) -> np.ndarray:
        """Softmax outputs (N, classes) in the model's output order for preprocessed inputs."""
        self.load()
        batch = np.asarray(images, np.float32)
        if batch.ndim == 3:
            batch = batch[None, ...]
        with self._lock:  # TF/Keras calls are not guaranteed thread-safe
            return np.asarray(self._infer(batch))

    def _to_prediction(self, row: np.ndarray) -> Prediction:
        return Prediction.from_probabilities(dict(zip(self.labels, row.tolist())))

    def predict(self, image: np.ndarray) -> Prediction:
        """Classify one preprocessed slice of shape (size, size, 1) scaled to [0, 1]."""
        return self._to_prediction(self.predict_arrays(image[None, ...])[0])

    def predict_batch(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """Classify several preprocessed slices in one forward pass."""
        if len(images) == 0:
            return []
        return [self._to_prediction(row) for row in self.predict_arrays(np.stack(images))]

    def prepare(self, data: bytes) -> np.ndarray:
        """Run the shared preprocessing for this model's input size."""
        return load_scan(data, self.input_size, max_pixels=self.max_pixels)

    def predict_bytes(self, data: bytes) -> Prediction:
        """Decode, preprocess and classify raw image bytes.

        Raises:
            ImageError: the bytes are not a usable image.
        """
        return self.predict(self.prepare(data))


def init_app(app) -> None:
    """Attach an (unloaded) predictor for the configured model; fails fast on bad metadata."""
    if app.config.get("BRAINMRI_SKIP_MODEL"):
        return
    app.extensions[EXTENSION_KEY] = Predictor.from_path(
        Path(app.config["BRAINMRI_MODEL_PATH"]), max_pixels=app.config["BRAINMRI_MAX_PIXELS"]
    )


def get_predictor() -> Predictor:
    """The predictor of the current app (one per worker process)."""
    from flask import current_app

    return current_app.extensions[EXTENSION_KEY]
