"""WSGI entry point for gunicorn (``wsgi_app = "main:app"`` in gunicorn.conf.py).

gunicorn imports this module in each worker after forking (``preload_app = False``), so the
model is loaded and warmed up in the process that serves it; TensorFlow is not fork-safe.
"""

from brainmri import create_app
from brainmri.predictor import EXTENSION_KEY

app = create_app()

# Load now, not on the first request, so /readyz turns 200 only once this worker can serve.
# Absent when FLASK_BRAINMRI_SKIP_MODEL=true (the pages then answer 503 for predictions).
if EXTENSION_KEY in app.extensions:
    app.extensions[EXTENSION_KEY].load()
