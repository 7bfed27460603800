"""The served models on the app: every model in the model folder (the registry) and the default.

`init_app` reads every model's metadata and checks its sha256, without importing TensorFlow, and
puts the unloaded registry and the default model's predictor into ``app.extensions``. main.py
loads them in each gunicorn worker after fork; under ``flask run`` the first prediction does.
Either way each model's load time is recorded (metrics.py, ``brainmri_model_load_seconds``).
"""

from __future__ import annotations

import time
from pathlib import Path

from flask import Flask
from flask import current_app
from flask import url_for

from ..inference import ModelRegistry
from ..inference import Predictor
from ..inference import default_model_path
from ..inference import discover_models
from .metrics import record_model_load

__all__ = ["EXTENSION_KEY", "MeasuredRegistry", "REGISTRY_KEY", "card_url", "get_predictor",
           "init_app", "load_predictor", "model_card_path"]

# The app.extensions keys (their values predate the web/ package; tools and tests set them).
EXTENSION_KEY = "brainmri.predictor"  # the default model's Predictor
REGISTRY_KEY = "brainmri.models"  # the ModelRegistry of every served model


def init_app(app: Flask) -> None:
    """Attach the (unloaded) model registry and its default predictor; fails fast on bad metadata.

    Raises:
        ModelError: a model is missing, its metadata is missing/invalid, or its sha256 differs.
    """
    if app.config.get("BRAINMRI_SKIP_MODEL"):
        return
    single = app.config.get("BRAINMRI_MODEL_PATH")
    if single:
        paths = [Path(single)]
        default = paths[0]
    else:
        model_dir = Path(app.config["BRAINMRI_MODEL_DIR"])
        default = default_model_path(model_dir, app.config.get("BRAINMRI_DEFAULT_MODEL"))
        paths = discover_models(model_dir)
    registry = MeasuredRegistry.from_paths(paths, default, app.config["BRAINMRI_MAX_PIXELS"])
    app.extensions[REGISTRY_KEY] = registry
    app.extensions[EXTENSION_KEY] = registry.get()


def get_predictor() -> Predictor:
    """The predictor of the current app (one per worker process)."""
    return current_app.extensions[EXTENSION_KEY]


def model_card_path(name: str) -> Path | None:
    """The generated card (`brainmri docs`) of a served model, or None: unknown name or no card."""
    registry = current_app.extensions.get(REGISTRY_KEY)
    served = set(registry) if registry is not None else {get_predictor().card.name}
    folder = current_app.config.get("BRAINMRI_MODEL_CARDS_DIR")
    if name not in served or not folder:
        return None
    path = Path(folder) / f"{name}.md"
    return path if path.is_file() else None


def card_url(name: str) -> str | None:
    """Where the page and the API link to a served model's card; None when it has none."""
    if model_card_path(name) is None:
        return None
    return url_for("pages.model_card", name=name)


def load_predictor(predictor: Predictor) -> None:
    """Load and warm up one model unless it is already, recording how long that took.

    Raises:
        ModelError: the file is not a loadable model or disagrees with its metadata.
    """
    if predictor.ready:
        return
    started = time.perf_counter()
    predictor.load()
    record_model_load(predictor.card.name, time.perf_counter() - started,
                      getattr(predictor, "engine", None))


class MeasuredRegistry(ModelRegistry):
    """The model registry whose `load` (main.py, in each worker) records every model's load time."""

    def load(self) -> None:
        """Load and warm up every model (the default first), timing each one.

        Raises:
            ModelError: a file is not a loadable model or disagrees with its metadata.
        """
        for name in self:  # ModelRegistry.load only loads each model, in this order
            load_predictor(self.get(name))
