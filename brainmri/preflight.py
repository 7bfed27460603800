"""Check the served models' files without TensorFlow: ``python -m brainmri.preflight``.

gunicorn's master runs this (``on_starting`` in gunicorn.conf.py) before it opens the port or
forks a worker. It builds the app exactly as a worker would (same configuration, same model
folder), which reads every model's metadata and checks its sha256, then opens each .h5 with
h5py and checks that it holds a Keras model config and weights; it loads no network.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from .inference import ModelError

__all__ = ["APP_LOAD_ERROR", "check_models", "main"]

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


def check_models() -> str | None:
    """None when every served model's files are in place, else the reason they are not."""
    from . import create_app
    from .web import REGISTRY_KEY

    try:
        app = create_app()
        registry = app.extensions.get(REGISTRY_KEY)
        for name in registry.names if registry is not None else []:
            check_keras_h5(registry.get(name).card.model_path)
    except ModelError as exc:
        return str(exc)
    return None


def main() -> int:
    """Exit status 0 when the models check out, APP_LOAD_ERROR (logged) otherwise."""
    problem = check_models()
    if problem is None:
        return 0
    logging.basicConfig()
    logging.getLogger("brainmri").critical("BrainMRI cannot start: %s", problem)
    return APP_LOAD_ERROR


if __name__ == "__main__":
    sys.exit(main())
