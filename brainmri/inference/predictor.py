"""Wrap the saved Keras CNN (.h5) and return per-class softmax confidences with the disclaimer.

TensorFlow is imported only when a model is served by the Keras engine (or its Keras model is
asked for), so the gunicorn master, the workers (ONNX engine) and the fast tests never pay for it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from .calibration import apply_temperature
from ..imaging import DEFAULT_MAX_PIXELS
from ..imaging import Scan
from ..imaging import load_scan
from ..imaging import read_scan
from .ood import NotBrainMRI
from .ood import OODGuard
from .uncertainty import UncertaintyRule
from .modelcard import CLASSES
from .modelcard import ModelCard
from .modelcard import ModelError
from .modelcard import read_keras_model
from .modelcard import read_model_card

__all__ = ["DISCLAIMER", "ENGINES", "Explanation", "Prediction", "Predictor", "engine_choice"]

DISCLAIMER = (
    "For research and education only. This is not a medical device and not a diagnosis; "
    "a qualified clinician must review every scan."
)


@dataclass(frozen=True)
class Prediction:
    """One classified slice: every class's probability, in the canonical order."""

    label: str
    confidence: float
    probabilities: dict[str, float]
    tumor_probability: float
    disclaimer: str = DISCLAIMER
    # Not a confident answer: the top-class probability is below the fitted threshold (set in
    # guarded.py for page, API and CLI), or the slice's features lie far from the training
    # slices of its class (`Predictor.atypical`).
    uncertain: bool = False

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


@dataclass(frozen=True)
class Explanation:
    """A Grad-CAM heatmap of the model input's shape, values in [0, 1], for one class."""

    heatmap: np.ndarray
    label: str
    layer: str


def configure_tensorflow_threads() -> None:
    """Default TF to one inter-op thread and all cores intra-op unless the environment says.

    gunicorn.conf.py sets TF_NUM_INTRAOP_THREADS per worker so W workers × T threads ≈ cores;
    the variables must be in place before TensorFlow initialises (tensorflow#57812).
    """
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


ENGINES = ("auto", "onnx", "keras")


def engine_choice() -> str:
    """BRAINMRI_ENGINE: "auto" (ONNX when its cache is there, else Keras), "onnx" or "keras"."""
    choice = os.environ.get("BRAINMRI_ENGINE", "auto").strip().lower() or "auto"
    if choice not in ENGINES:
        raise ModelError(f"BRAINMRI_ENGINE is {choice!r}; choose one of {', '.join(ENGINES)}.")
    return choice


class Predictor:
    """Loads the CNN once per process and serialises calls into it.

    Two engines run the same network: onnxruntime on the ONNX copy cached from the .h5
    (`onnxengine`: no TensorFlow in the process, what gunicorn workers use) and Keras on the .h5
    itself (training, evaluation, and any model the ONNX engine cannot serve).
    """

    def __init__(self, card: ModelCard, max_pixels: int = DEFAULT_MAX_PIXELS,
                 engine: str | None = None) -> None:
        self.card = card
        self.max_pixels = max_pixels
        self.requested_engine = engine
        self.engine: str | None = None  # "onnx" or "keras" once loaded
        self._onnx = None
        self._model = None
        self._infer = None
        self._forward = None
        self._gradcam = None
        self.conv_layer: str | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_path(cls, model_path: Path, max_pixels: int = DEFAULT_MAX_PIXELS,
                  engine: str | None = None) -> Predictor:
        """Validate the model's metadata (cheap, no TensorFlow) and return an unloaded predictor.

        Raises:
            ModelError: missing model, missing/invalid metadata or sha256 mismatch.
        """
        return cls(read_model_card(Path(model_path)), max_pixels=max_pixels, engine=engine)

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
        return self.engine is not None

    def load(self) -> None:
        """Load the model on its engine (ONNX cache or .h5) and run a warm-up.

        Raises:
            ModelError: the file is not a loadable Keras model or disagrees with its metadata,
                or BRAINMRI_ENGINE=onnx and the model has no valid ONNX cache.
        """
        with self._lock:
            if self.engine is not None:
                return
            choice = self.requested_engine or engine_choice()
            if choice != "keras" and self._load_onnx():
                self.engine = "onnx"
            elif choice == "onnx":
                raise ModelError(
                    f"{self.card.model_path.name} has no valid ONNX cache (BRAINMRI_ENGINE=onnx); "
                    "build it with `brainmri build-cache`, or let gunicorn's start build it.")
            else:
                self._load_keras()
                self.engine = "keras"

    def _load_onnx(self) -> bool:
        """Serve from the ONNX cache when onnxruntime is installed and the cache checks out."""
        from . import onnxengine

        if not onnxengine.onnx_available():
            return False
        engine = onnxengine.OnnxEngine.load(self.card)
        if engine is None:
            return False
        shape = (self.input_size, self.input_size, self.card.channels)
        engine.gradcam(np.zeros((1, *shape), np.float32), np.zeros(1, np.int64))  # warm-up
        self._onnx = engine
        self.conv_layer = engine.explained_layer
        return True

    def _load_keras(self) -> None:
        model = self._read_keras()
        import tensorflow as tf

        expected = (self.input_size, self.input_size, self.card.channels)
        # One extra model over the same layers: softmax plus the last conv block, for the
        # OOD feature distance and Grad-CAM (explain.py), traced and warmed up here.
        from . import explain

        conv = explain.find_last_conv_layer(model, self.card.raw.get("last_conv_layer"))
        zeros = np.zeros((1, *expected), np.float32)
        if conv is not None:
            self._forward, self._gradcam = explain.build_functions(model, conv, expected)
            self._forward(zeros)
            self._gradcam(zeros, np.zeros(1, np.int32))
            # Softmax comes from the same traced function: one trace fewer at start-up.
            forward = self._forward
            self._infer = lambda x: forward(x)[0]
        else:
            # A traced function with a fixed signature: no retracing, a few ms per call,
            # and no Model.predict() memory growth (tensorflow#33009). autograph=False: no
            # generated files in the temp folder.
            self._infer = tf.function(
                lambda x: model(x, training=False),
                input_signature=[tf.TensorSpec((None, *expected), tf.float32)],
                reduce_retracing=True, autograph=False,
            )
            self._infer(zeros)  # warm-up: trace + allocate
        self.conv_layer = conv

    def _read_keras(self):
        """The .h5 as a Keras model (read once), checked against the metadata."""
        if self._model is None:
            configure_tensorflow_threads()
            self._model = read_keras_model(self.card)
        return self._model

    @property
    def keras_model(self):
        """The Keras model from the .h5 (read on first use, whichever engine serves)."""
        with self._lock:
            return self._read_keras()

    @property
    def temperature(self) -> float:
        """Fitted temperature from the metadata ("calibration"), 1.0 before `brainmri calibrate`."""
        return float((self.card.raw.get("calibration") or {}).get("temperature", 1.0))

    @property
    def uncertain_below(self) -> float | None:
        """Fitted "uncertain" threshold on the calibrated top-class probability, if any."""
        value = (self.card.raw.get("calibration") or {}).get("uncertain_below")
        return None if value is None else float(value)

    @cached_property
    def uncertainty(self) -> UncertaintyRule | None:
        """The fitted "uncertain" rule (metadata "uncertainty", `brainmri calibrate`), if any."""
        meta = self.card.raw.get("uncertainty")
        return UncertaintyRule.from_metadata(meta) if meta else None

    def atypical(self, calibrated: np.ndarray, features: np.ndarray | None) -> np.ndarray:
        """Rows whose features lie far from the training slices of their predicted class."""
        rule = self.uncertainty
        if rule is None:
            return np.zeros(len(np.atleast_2d(calibrated)), bool)
        return rule.atypical(calibrated, features)

    @cached_property
    def guard(self) -> OODGuard | None:
        """The out-of-distribution guard fitted by `brainmri calibrate`, None before that."""
        meta = self.card.raw.get("ood")
        if not meta:
            return None
        link = meta.get("network")
        network = self._guard_network(link) if link else None
        if "brain_distance" in meta["bounds"] and getattr(network, "embedding", None) is None:
            # Serving without it would drop a check silently: refuse to start instead.
            raise ModelError(f"{self.card.model_path.name}'s guard checks the guard network's "
                             "brain_distance, but the network's metadata has no fit for it; run "
                             "`brainmri train-guard` and `brainmri calibrate`.")
        return OODGuard.from_metadata(meta, network)

    def _guard_network(self, link: dict):
        """The guard network that the metadata names, checked against its recorded sha256."""
        import hashlib

        from .guardnet import GuardNet

        path = self.card.model_path.parent / link["file"]
        if not path.is_file():
            raise ModelError(f"{self.card.model_path.name}'s guard needs {path.name}, which is "
                             f"missing; run `brainmri train-guard` and `brainmri calibrate`.")
        if hashlib.sha256(path.read_bytes()).hexdigest() != link["sha256"]:
            raise ModelError(f"{path.name} is not the guard network {self.card.model_path.name} "
                             f"was calibrated with (sha256 differs); run `brainmri calibrate`.")
        return GuardNet.load(path, link.get("onnx_sha256"), sha256=link["sha256"])

    def predict_arrays(self, images: np.ndarray) -> np.ndarray:
        """Uncalibrated softmax outputs (N, classes) in the model's output order."""
        self.load()
        batch = np.asarray(images, np.float32)
        if batch.ndim == 3:
            batch = batch[None, ...]
        if self._onnx is not None:
            return self._onnx.forward(batch)[0]
        with self._lock:  # TF/Keras calls are not guaranteed thread-safe
            return np.asarray(self._infer(batch))

    def forward(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Uncalibrated softmax (N, classes) and pooled last-conv features (N, C), one pass."""
        self.load()
        batch = np.asarray(images, np.float32)
        if batch.ndim == 3:
            batch = batch[None, ...]
        if self._onnx is not None:
            return self._onnx.forward(batch)
        if self._forward is None:
            return self.predict_arrays(batch), None
        with self._lock:
            probs, features = self._forward(batch)
        return np.asarray(probs), np.asarray(features)

    def calibrate(self, probs: np.ndarray) -> np.ndarray:
        """Apply the fitted temperature to softmax outputs; rows still sum to 1."""
        return apply_temperature(probs, self.temperature)

    def _to_prediction(self, row: np.ndarray) -> Prediction:
        calibrated = self.calibrate(row[None, :])[0]
        return Prediction.from_probabilities(dict(zip(self.labels, calibrated.tolist())))

    def predict(self, image: np.ndarray) -> Prediction:
        """Classify one preprocessed slice of shape (size, size, 1) scaled to [0, 1] (calibrated)."""
        return self._to_prediction(self.predict_arrays(image[None, ...])[0])

    def predict_checked(self, image: np.ndarray, colourfulness: float | None = None,
                        peak_brightness: float | None = None) -> Prediction:
        """Refuse inputs that are not brain MRI slices, else classify (calibrated), in one pass.

        Args:
            image: the preprocessed slice, (size, size, 1) in [0, 1].
            colourfulness: the file's colour (`prepare_scan`), for the colour check (None: grey).
            peak_brightness: the file's peak brightness (`prepare_scan`), for the near-black
                check (None: not measured).

        Raises:
            NotBrainMRI: the fitted guard refuses the input (no class is given).
        """
        result = self.predict_checked_batch([image], [colourfulness], peaks=[peak_brightness])[0]
        if isinstance(result, NotBrainMRI):
            raise result
        return result

    def predict_checked_batch(self, images: Sequence[np.ndarray],
                              colourfulness: Sequence[float | None] | None = None,
                              guard: bool = True,
                              peaks: Sequence[float | None] | None = None,
                              ) -> list[Prediction | NotBrainMRI]:
        """Screen and classify (calibrated) several preprocessed slices in one forward pass.

        Args:
            images: preprocessed slices, each (size, size, 1) in [0, 1].
            colourfulness: each slice's file colour (`prepare_scan`), for the colour check
                (None: grey).
            guard: False skips the out-of-distribution guard (research use).
            peaks: each slice's file peak brightness (`prepare_scan`), for the near-black
                check (None: not measured).

        Returns:
            Per input, in order, its Prediction or the NotBrainMRI refusal; refusals are
            returned rather than raised so that one refused slice never hides the others.
        """
        if len(images) == 0:
            return []
        colours = list(colourfulness) if colourfulness is not None else [None] * len(images)
        probs, features = self.forward(np.stack(images))
        screen = self.guard if guard else None
        verdicts = (screen.assess_many(images, colours, features, peaks)
                    if screen is not None else None)
        calibrated = self.calibrate(probs)
        # Unlike the training slices of the class it was given: never a confident answer,
        # whatever the probability says (the low-probability half of the rule is the caller's).
        atypical = self.atypical(calibrated, features)
        results: list[Prediction | NotBrainMRI] = []
        for i in range(len(images)):
            if verdicts is not None and verdicts[i].refused:
                results.append(NotBrainMRI(verdicts[i]))
                continue
            prediction = Prediction.from_probabilities(dict(zip(self.labels, calibrated[i].tolist())))
            results.append(replace(prediction, uncertain=True) if atypical[i] else prediction)
        return results

    def explain(self, image: np.ndarray, label: str | None = None) -> Explanation:
        """Grad-CAM heatmap (size, size) in [0, 1] for `label` (default: the top class).

        Raises:
            ModelError: the model has no convolutional layer to explain.
        """
        self.load()
        batch = np.asarray(image, np.float32)[None, ...]
        if self._onnx is not None:
            if label is None:
                index = int(np.argmax(self._onnx.forward(batch)[0][0]))
            else:
                index = self.labels.index(label)
            cam, _ = self._onnx.gradcam(batch, np.array([index]))
            return Explanation(cam[0], self.labels[index], self.conv_layer)
        if self._gradcam is None:
            raise ModelError(f"{self.card.model_path.name} has no convolutional layer for Grad-CAM.")
        with self._lock:
            if label is None:
                probs, _ = self._forward(batch)
                index = int(np.argmax(np.asarray(probs)[0]))
            else:
                index = self.labels.index(label)
            cam, _ = self._gradcam(batch, np.array([index], np.int32))
        return Explanation(np.asarray(cam)[0], self.labels[index], self.conv_layer)

    def gradcam_batch(self, images: np.ndarray, class_indices: np.ndarray) -> np.ndarray:
        """Grad-CAM heatmaps (N, size, size) in [0, 1], one class index (output order) per image.

        Raises:
            ModelError: the model has no convolutional layer to explain.
        """
        self.load()
        if self._onnx is not None:
            return self._onnx.gradcam(np.asarray(images, np.float32), np.asarray(class_indices))[0]
        if self._gradcam is None:
            raise ModelError(f"{self.card.model_path.name} has no convolutional layer for Grad-CAM.")
        with self._lock:
            cam, _ = self._gradcam(np.asarray(images, np.float32),
                                   np.asarray(class_indices, np.int32))
        return np.asarray(cam)

    def predict_batch(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """Classify several preprocessed slices in one forward pass."""
        if len(images) == 0:
            return []
        return [self._to_prediction(row) for row in self.predict_arrays(np.stack(images))]

    def prepare(self, data: bytes) -> np.ndarray:
        """Run the shared preprocessing for this model's input size."""
        return load_scan(data, self.input_size, max_pixels=self.max_pixels)

    def prepare_scan(self, data: bytes) -> Scan:
        """`prepare`, with the file's colour and peak brightness from the same decode, for
        `predict_checked_batch`."""
        return read_scan(data, self.input_size, max_pixels=self.max_pixels)

    def predict_bytes(self, data: bytes) -> Prediction:
        """Decode, preprocess and classify raw image bytes.

        Raises:
            ImageError: the bytes are not a usable image.
        """
        return self.predict(self.prepare(data))
