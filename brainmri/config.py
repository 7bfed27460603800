"""Configuration defaults and the secret key: no hard-coded secret, zero-configuration start.

Every key can be overridden from the environment with the ``FLASK_`` prefix
(``FLASK_MAX_CONTENT_LENGTH=10485760``, ``FLASK_BRAINMRI_MODEL_PATH=/srv/model.h5``); values are
parsed as JSON, so numbers become ints and booleans must be lowercase ``true``/``false``.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

from flask import Flask

from .imaging import DEFAULT_MAX_PIXELS

__all__ = ["DEFAULTS", "PROJECT_ROOT", "SECRET_KEY_FILE", "ensure_secret_key", "read_or_create_key"]

PROJECT_ROOT = Path(__file__).resolve().parent.parent

SECRET_KEY_FILE = "secret_key"

DEFAULTS: dict[str, Any] = {
    # From FLASK_SECRET_KEY, else generated once into instance/secret_key (ensure_secret_key).
    "SECRET_KEY": None,
    # Larger request bodies are refused with 413 before any image decoding happens.
    "MAX_CONTENT_LENGTH": 20 * 1024 * 1024,
    # Non-file form fields (only the form token). Werkzeug also checks this against its multipart
    # parse buffer, which is fed 64 KiB at a time, so a value at or below 64 KiB would refuse
    # every file larger than that with 413; 256 KiB leaves headroom.
    "MAX_FORM_MEMORY_SIZE": 256 * 1024,
    # The upload form has two parts (token + file); leave headroom, refuse part floods.
    # The batch endpoint raises its own request's limit to BRAINMRI_BATCH_MAX_FILES + 2.
    "MAX_FORM_PARTS": 10,
    # Most files POST /api/v1/predict/batch takes in one request (all within MAX_CONTENT_LENGTH).
    "BRAINMRI_BATCH_MAX_FILES": 16,
    # One study (POST /studies, /api/v1/studies; web/studies.py, docs/studies.md): the most
    # slices, bytes (the body, and what a ZIP or .nii.gz inflates to) and decoded pixels (all
    # slices together). A typical MR series, 150-300 DICOM files of 50-150 MB, fits.
    "BRAINMRI_STUDY_MAX_SLICES": 400,
    "BRAINMRI_STUDY_MAX_BYTES": 200 * 1024 * 1024,
    "BRAINMRI_STUDY_MAX_PIXELS": 100_000_000,
    # Slices the study page shows in full (image, heatmap, every class), most suspicious first.
    "BRAINMRI_STUDY_DETAILED_SLICES": 24,
    "SESSION_COOKIE_HTTPONLY": True,
    "SESSION_COOKIE_SAMESITE": "Lax",  # set FLASK_SESSION_COOKIE_SECURE=true behind HTTPS
    # Every <name>.h5 here (with its metadata) is served; requests pick one with `model=`.
    "BRAINMRI_MODEL_DIR": str(PROJECT_ROOT / "model"),
    # The model used when a request names none; None = the best leakage-free test accuracy
    # recorded in the metadata (inference/registry.py).
    "BRAINMRI_DEFAULT_MODEL": None,
    # The generated model cards (`brainmri docs`): /models/<name>/card serves <name>.md from here.
    "BRAINMRI_MODEL_CARDS_DIR": str(PROJECT_ROOT / "docs" / "models"),
    # Set to one .h5 to serve only that model (single-model deployments, tests).
    "BRAINMRI_MODEL_PATH": None,
    # Images whose header declares more pixels are refused before decoding (decompression bombs).
    "BRAINMRI_MAX_PIXELS": DEFAULT_MAX_PIXELS,
    # True only for tools that need the app but no model (tests, the CLI before training).
    "BRAINMRI_SKIP_MODEL": False,
    # Signed, session-bound token on the upload form (web/security.py says why not Origin checks).
    "BRAINMRI_CSRF_ENABLED": True,
    "BRAINMRI_CSRF_TIME_LIMIT": 3600,
    # The result page labels a prediction "uncertain", not a finding, when the top class's softmax
    # output is below this. With four classes chance is 0.25; below 0.6 the other three classes
    # together still hold over 40%, so the model leans rather than decides, and CNN softmax scores
    # are usually over-confident, so the real error rate there is higher still. 0.6 errs on the
    # side of saying "uncertain". Provisional: a later issue calibrates it on validation data.
    "BRAINMRI_UNCERTAIN_BELOW": 0.6,
    # Predictions per client address (web/ratelimit.py, Flask-Limiter): a token bucket refilling at
    # this rate ("N/second|minute|hour", or an int per minute; null or 0 turns it off) and holding
    # BURST tokens. A person uploading slices by hand or a script that waits for each answer
    # stays far below one a second; a client looping as fast as it can is cut to the rate.
    "BRAINMRI_RATE_LIMIT": "60/minute",
    "BRAINMRI_RATE_LIMIT_BURST": 30,
    # Where the buckets live. memory:// = in each worker process (W workers: up to W times the
    # limit, nothing to run); a Redis URI (redis://host:6379/0, rediss://, redis+sentinel://,
    # redis+cluster://) = one bucket per client for every worker and host. If Redis is down,
    # each worker falls back to its own in-memory buckets until it answers again.
    "RATELIMIT_STORAGE_URI": "memory://",
    # Seconds a Redis connect or command may take before that request falls back to memory.
    "RATELIMIT_STORAGE_TIMEOUT": 0.5,
    # Clients remembered per worker in memory; idle ones are dropped first (bounded memory).
    "BRAINMRI_RATE_LIMIT_MAX_CLIENTS": 10_000,
    # Reverse proxies in front of the app that set X-Forwarded-For (werkzeug ProxyFix); 0 = none,
    # so request.remote_addr is the peer. Set it behind nginx, or every user shares one bucket.
    "BRAINMRI_TRUSTED_PROXIES": 0,
}


def ensure_secret_key(app: Flask) -> None:
    """Use FLASK_SECRET_KEY, else a random key created once in the instance folder (mode 0600).

    Every gunicorn worker reads the same file, so form tokens and session cookies signed by one
    worker verify in another, and a newcomer's first ``uv run`` needs no configuration.
    """
    if app.config.get("SECRET_KEY"):
        return
    app.config["SECRET_KEY"] = read_or_create_key(Path(app.instance_path) / SECRET_KEY_FILE)


def read_or_create_key(path: Path) -> str:
    """Return the key stored at `path`, creating it atomically if it does not exist yet.

    The key is written to a private temporary file first and then hard-linked into place:
    ``link`` fails if the name exists (like ``O_EXCL``) and the linked file is already complete,
    so concurrent workers starting together all end up reading the same, fully written key.

    Raises:
        RuntimeError: the existing key file is empty (delete it to generate a new key).
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".secret_key.")  # mode 0600
        try:
            with os.fdopen(fd, "w", encoding="ascii") as handle:
                handle.write(secrets.token_hex(32))
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(tmp_name, path)
            except FileExistsError:
                pass  # another worker won the race; use its key
        finally:
            os.unlink(tmp_name)
    key = path.read_text(encoding="ascii").strip()
    if not key:
        raise RuntimeError(
            f"The secret key file {SECRET_KEY_FILE} in the instance folder is empty; "
            "delete it to generate a new key, or set FLASK_SECRET_KEY."
        )
    return key
