"""BrainMRI: classify brain MRI slices with a Keras CNN (research and education use only)."""

from __future__ import annotations

from typing import Any

from flask import Flask

from .config import PROJECT_ROOT

__all__ = ["PROJECT_ROOT", "create_app"]


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    """Create and configure the BrainMRI application.

    Args:
        test_config: settings that replace the environment (``FLASK_*``) when given.

    Raises:
        ModelError: the model or its metadata is missing or does not match (message says how
            to train one), unless BRAINMRI_SKIP_MODEL is set.
    """
    app = Flask(
        __name__,
        template_folder=str(PROJECT_ROOT / "templates"),
        static_folder=str(PROJECT_ROOT / "static"),
    )
    configure(app, test_config)
    register_extensions(app)
    register_errorhandlers(app)
    register_blueprints(app)
    return app


def configure(app: Flask, test_config: dict[str, Any] | None) -> None:
    """Defaults, then the environment or the test settings, then the secret key."""
    from . import config

    app.config.from_mapping(config.DEFAULTS)
    if test_config is None:
        app.config.from_prefixed_env()  # FLASK_SECRET_KEY, FLASK_BRAINMRI_MODEL_PATH, …
    else:
        app.config.update(test_config)
    config.ensure_secret_key(app)


def register_extensions(app: Flask) -> None:
    """Request logging, metrics, security, and the (not yet loaded) predictor."""
    from .web import logs
    from .web import metrics
    from .web import models
    from .web import ratelimit
    from .web import security

    logs.init_app(app)  # first, so the request id exists for every later hook
    metrics.init_app(app)  # before the limiter, so refused requests are timed and counted too
    ratelimit.init_app(app)  # before security: a refused client costs no form parsing
    security.init_app(app)
    # Cheap: validates the metadata and sha256 without importing TensorFlow. The model itself
    # loads in main.py after gunicorn forks, or on the first prediction under `flask run`.
    models.init_app(app)


def register_errorhandlers(app: Flask) -> None:
    """Map every error to JSON for the API and the HTML error page elsewhere."""
    from .web import errors

    errors.init_app(app)


def register_blueprints(app: Flask) -> None:
    """The pages and the JSON API."""
    from .web import api
    from .web import studies
    from .web import views

    app.register_blueprint(views.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(studies.bp)
