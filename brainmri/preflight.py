"""Check the served models' files without TensorFlow: ``python -m brainmri.preflight``.

gunicorn's master runs this (``on_starting`` in gunicorn.conf.py) before it opens the port or
forks a worker. It builds the app exactly as a worker would (same configuration, same model
folder), which reads every model's metadata and checks its sha256, then opens each .h5 with
h5py and checks that it holds a Keras model config and weights. Then it builds any missing ONNX
cache (`inference.onnxengine`), the one step that imports TensorFlow, so that the workers it
forks serve from onnxruntime and never do.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from .inference import ModelError

__all__ = ["APP_LOAD_ERROR", "build_onnx_caches", "check_models", "ensure_cache", "main",
           "quiet_tensorflow", "served_cards"]

# gunicorn's "App failed to load" exit status, also used by main.py in the workers.
APP_LOAD_ERROR = 4


def check_keras_h5(path: Path) -> None:
    """Raise ModelError unless `path` is an HDF5 file with a Keras model config and weights."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            config = json.loads(h5.attrs["model_config"])
            if "config" not in config or "model_weights" not in h5:
                raise KeyError("model_weights")
    except Exception as exc:  # h5py raises OSError, KeyError, ValueError... for a bad file
        raise ModelError(f"{path.name} could not be loaded as a Keras model "
                         f"({type(exc).__name__}).") from exc


def served_cards() -> list:
    """The model cards the app would serve (same configuration as a worker).

    Raises:
        ModelError: a served model's metadata is missing or invalid, or its sha256 differs.
    """
    from . import create_app
    from .web import REGISTRY_KEY

    registry = create_app().extensions.get(REGISTRY_KEY)
    return [registry.get(name).card for name in registry.names] if registry is not None else []


def check_models(cards: list | None = None) -> str | None:
    """None when every served model's files are in place, else the reason they are not.

    `cards` are the served models' cards when the caller already has them (`served_cards`),
    so that the app, and the sha256 of every model file, is built and read once.
    """
    try:
        for card in served_cards() if cards is None else cards:
            check_keras_h5(card.model_path)
    except ModelError as exc:
        return str(exc)
    return None


def build_onnx_caches(cards: list, log: logging.Logger) -> str | None:
    """Build each model's missing ONNX cache (here, so that workers never import TensorFlow).

    A model the ONNX engine cannot serve, or a cache folder that cannot be written, is logged
    and left to the Keras engine, unless BRAINMRI_ENGINE=onnx, when it is a reason not to start;
    a model Keras cannot load is always one (the reason is returned).
    """
    from .inference import engine_choice
    from .inference import onnxengine

    choice = engine_choice()
    if choice == "keras" or not cards:
        return None
    if not onnxengine.onnx_available():
        log.warning("onnxruntime is not installed: workers serve with TensorFlow (slower start, "
                    "about 800 MiB each)")
        return "onnxruntime is not installed" if choice == "onnx" else None

    def announce(card) -> None:
        log.info("building the ONNX cache for %s in %s (once per model file)",
                 card.model_path.name, onnxengine.cache_dir())

    for card in cards:
        try:
            record, built = ensure_cache(card, before_build=announce)
        except (onnxengine.OnnxUnsupported, OSError) as exc:
            log.warning("%s is served by the Keras engine: %s", card.model_path.name, exc)
            if choice == "onnx":
                return str(exc)
            continue
        except ModelError as exc:  # Keras cannot read it either: no engine can serve it
            return str(exc)
        if not built:
            continue
        log.info("ONNX cache for %s ready (largest difference from Keras %.1e)",
                 card.model_path.name, record["max_difference"])
    return None


def ensure_cache(card, force: bool = False,
                 before_build: Callable[[object], None] | None = None) -> tuple[dict, bool]:
    """`card`'s valid ONNX cache record, built unless one checks out (or `force`), and if it was.

    `before_build(card)` is called just before a build, the slow step that imports TensorFlow,
    so that a caller can say so first.

    Raises:
        OnnxUnsupported: the ONNX engine cannot serve the model (Keras serves it instead).
        ModelError: Keras cannot load the .h5, or it disagrees with its metadata.
        OSError: the cache folder cannot be written.
    """
    from .inference import onnxengine

    record = None if force else onnxengine.read_cache(card)
    if record is not None:
        return record, False
    if before_build is not None:
        before_build(card)
    quiet_tensorflow()
    return onnxengine.build_cache(card), True


def quiet_tensorflow() -> None:
    """TensorFlow's C++ start-up lines off unless BRAINMRI_TF_LOGS=1 (before it is imported)."""
    import os

    if os.environ.get("BRAINMRI_TF_LOGS") != "1":
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main() -> int:
    """Exit status 0 when the models check out (ONNX caches built), APP_LOAD_ERROR otherwise."""
    from .web import logformat

    handler = logging.StreamHandler()  # stderr, which gunicorn's master passes through
    handler.setFormatter(logformat.formatter(logformat.format_from_env()))  # as the servers'
    log = logging.getLogger("brainmri.preflight")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        cards = served_cards()  # the app is built, and every model file hashed, once
        problem = check_models(cards) or build_onnx_caches(cards, log)
    except ModelError as exc:
        problem = str(exc)
    if problem is None:
        return 0
    log.critical("BrainMRI cannot start: %s", problem)
    return APP_LOAD_ERROR


if __name__ == "__main__":
    sys.exit(main())
