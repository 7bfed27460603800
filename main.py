"""WSGI entry point for gunicorn (``wsgi_app = "main:app"`` in gunicorn.conf.py).

gunicorn imports this module in each worker after forking (``preload_app = False``), so the
model is loaded and warmed up in the process that serves it; TensorFlow is not fork-safe.
"""

import logging
import os

from brainmri import create_app
from brainmri.inference import ModelError
from brainmri.preflight import APP_LOAD_ERROR  # gunicorn's "App failed to load": the master
from brainmri.web import REGISTRY_KEY          # stops instead of respawning hopeless workers

try:
    app = create_app()
    # Load every served model now, not on the first request, so /readyz turns 200 only once
    # this worker can serve any of them. Absent when FLASK_BRAINMRI_SKIP_MODEL=true (the pages
    # then answer 503 for predictions).
    if REGISTRY_KEY in app.extensions:
        registry = app.extensions[REGISTRY_KEY]
        registry.load()
        # Operators (and benchmarks/harness.py) see each worker become able to serve.
        app.logger.info("worker ready pid=%d models=%s default=%s", os.getpid(),
                        ",".join(registry.names), registry.default)
except ModelError as exc:
    logging.basicConfig()
    logging.getLogger("brainmri").critical("BrainMRI cannot start: %s", exc)
    raise SystemExit(APP_LOAD_ERROR) from None
