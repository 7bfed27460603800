"""The metadata JSON that travels beside every model file, and its validation at load time.

Like timm's pretrained configs, the metadata says what the weights expect: class names in output
order, input size, the preprocessing, the data it was trained on and how well it did. A model
whose metadata is missing or disagrees with the weights is refused at startup, never guessed at.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "linked_files",
    "CLASSES",
    "TRAIN_HINT",
    "ModelCard",
    "ModelError",
    "file_sha256",
    "metadata_path_for",
    "read_keras_model",
    "read_model_card",
    "write_model_card",
]

# Canonical class names; every response lists probabilities in this order.
CLASSES = ("glioma", "meningioma", "no_tumor", "pituitary")

TRAIN_HINT = "uv run brainmri train --data ../shared/data/sartaj --data ../shared/data/lgg"


class ModelError(RuntimeError):
    """The model or its metadata cannot be served; the message says what to do."""


@dataclass(frozen=True)
class ModelCard:
    """Validated metadata of one model file."""

    model_path: Path
    name: str
    version: str
    classes: tuple[str, ...]
    input_size: int
    channels: int
    sha256: str
    raw: dict[str, Any]

    @property
    def summary(self) -> dict[str, str]:
        """Name, version and sha256, as the API reports them."""
        return {"name": self.name, "version": self.version, "sha256": self.sha256}


def metadata_path_for(model_path: Path) -> Path:
    """Return the metadata file that belongs to `model_path` (same stem, `.json`)."""
    return model_path.with_suffix(".json")


def linked_files(model_path: Path) -> list[str]:
    """Files beside the model that its metadata names, relative to its folder: the guard
    network (`ood.network.file`) with its ONNX copy and JSON. Copies of a model take them along."""
    import json

    meta = json.loads(metadata_path_for(model_path).read_text())
    link = (meta.get("ood") or {}).get("network")
    if not link:
        return []
    base = Path(link["file"])
    return [str(p) for p in (base, base.with_suffix(".onnx"), base.with_suffix(".json"))
            if (Path(model_path).parent / p).is_file()]


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_model_card(model_path: Path, verify_sha256: bool = True) -> ModelCard:
    """Read and validate the metadata of `model_path`.

    Raises:
        ModelError: the model or metadata file is missing, malformed, or does not match.
    """
    model_path = Path(model_path)
    meta_path = metadata_path_for(model_path)
    if not model_path.is_file():
        raise ModelError(
            f"No trained model at {model_path}. Train one with: {TRAIN_HINT} "
            "(or set FLASK_BRAINMRI_MODEL_PATH to an existing .h5)."
        )
    if not meta_path.is_file():
        raise ModelError(
            f"Model metadata {meta_path.name} is missing beside {model_path.name}; "
            "it is written by `brainmri train`. Refusing to guess class order and input size."
        )
    try:
        raw = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"Model metadata {meta_path.name} is not valid JSON: {exc}") from exc
    try:
        classes = tuple(raw["classes"])
        size = int(raw["input"]["size"])
        channels = int(raw["input"]["channels"])
        expected_sha = str(raw["sha256"])
        name = str(raw.get("name", model_path.stem))
        version = str(raw.get("version", "0"))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(
            f"Model metadata {meta_path.name} lacks a required field ({exc}); "
            "it needs classes, input.size, input.channels and sha256."
        ) from exc
    unknown = sorted(set(classes) - set(CLASSES))
    if unknown or len(set(classes)) != len(classes):
        raise ModelError(
            f"Model metadata {meta_path.name} lists classes {list(classes)}; "
            f"expected each of {list(CLASSES)} at most once."
        )
    from ..imaging import PREPROCESSING_VERSION

    trained_with = (raw.get("preprocessing") or {}).get("version")
    if trained_with is not None and int(trained_with) != PREPROCESSING_VERSION:
        # Serving it would feed the network inputs prepared unlike its training images.
        raise ModelError(
            f"{model_path.name} was trained on preprocessing version {trained_with}, but this "
            f"code prepares version {PREPROCESSING_VERSION} inputs; retrain it with: {TRAIN_HINT}."
        )
    if verify_sha256:
        actual = file_sha256(model_path)
        if actual != expected_sha:
            raise ModelError(
                f"{model_path.name} does not match its metadata (sha256 {actual[:12]}…, "
                f"metadata says {expected_sha[:12]}…). The file changed or is corrupt; "
                "retrain or restore both files together."
            )
    return ModelCard(model_path, name, version, classes, size, channels, expected_sha, raw)


def write_model_card(model_path: Path, metadata: dict[str, Any]) -> Path:
    """Write the metadata JSON beside `model_path`, stamping the file's sha256."""
    model_path = Path(model_path)
    metadata = {**metadata, "sha256": file_sha256(model_path)}
    meta_path = metadata_path_for(model_path)
    meta_path.write_text(json.dumps(metadata, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return meta_path


def read_keras_model(card: ModelCard):
    """The card's .h5 as a Keras model (compile=False), checked against the metadata's shapes.

    Imports TensorFlow. Raises:
        ModelError: the file is not a loadable Keras model or disagrees with its metadata.
    """
    import keras

    name = card.model_path.name
    try:
        model = keras.saving.load_model(card.model_path, compile=False)
    except Exception as exc:  # h5py/keras raise many types for a bad file
        raise ModelError(f"{name} could not be loaded as a Keras model "
                         f"({type(exc).__name__}).") from exc
    outputs = model.output_shape[-1]
    if outputs != len(card.classes):
        raise ModelError(f"{name} has {outputs} outputs but its metadata lists "
                         f"{len(card.classes)} classes.")
    expected = (card.input_size, card.input_size, card.channels)
    if tuple(model.input_shape[1:]) != expected:
        raise ModelError(f"{name} takes inputs {model.input_shape[1:]} but its metadata says "
                         f"{expected}.")
    return model
