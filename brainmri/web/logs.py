"""Request ids and log lines: what was asked and how it went, never who or which file.

A prediction is logged with its request id, byte size, detected type, top label and latency.
Filenames (they may name a patient), pixels and exception text shown to users are never logged
here; tracebacks go to the server log only (errors.py). Lines are logfmt or JSON
(BRAINMRI_LOG_FORMAT, logformat.py), the same shape as gunicorn's own (gunicorn.conf.py).
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from flask import Flask
from flask import Response
from flask import g
from flask import has_request_context
from flask import request
from flask.logging import default_handler

from ..imaging import sniff_format
from .logformat import format_from_env
from .logformat import formatter

__all__ = ["configure_logger", "init_app", "log_batch", "log_prediction", "request_id"]

log = logging.getLogger("brainmri.predict")

# Accept a proxy's X-Request-ID only if it cannot smuggle anything into a log line.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def request_id() -> str:
    """The id of the current request ("-" outside a request)."""
    if not has_request_context():
        return "-"
    if "request_id" not in g:
        incoming = request.headers.get("X-Request-ID", "")
        g.request_id = incoming if _REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex[:16]
    return g.request_id


def _start_timer() -> None:
    g.started = time.perf_counter()
    request_id()


def _add_request_id(response: Response) -> Response:
    response.headers["X-Request-ID"] = request_id()
    return response


def elapsed_ms() -> float:
    """Milliseconds since the current request started."""
    return (time.perf_counter() - g.get("started", time.perf_counter())) * 1000.0


def log_prediction(data: bytes, label: str) -> None:
    """One line per classified upload: id, size, sniffed type, top label, latency."""
    log.info(
        "prediction request_id=%s bytes=%d type=%s label=%s latency_ms=%.1f",
        request_id(), len(data), sniff_format(data) or "unknown", label, elapsed_ms(),
    )


def log_batch(files: int, error_codes: list[str]) -> None:
    """One line per batch request: id, file count, how many failed and why (codes only)."""
    log.info(
        "batch request_id=%s files=%d errors=%d codes=%s latency_ms=%.1f",
        request_id(), files, len(error_codes), ",".join(sorted(set(error_codes))) or "-",
        elapsed_ms(),
    )


def configure_logger(app: Flask) -> None:
    """Send the package's INFO lines to stderr (gunicorn's error log) through Flask's handler.

    Raises:
        ValueError: BRAINMRI_LOG_FORMAT names no known format.
    """
    # app.logger is the "brainmri" logger; first access attaches Flask's stderr handler unless
    # logging is already configured. Child loggers ("brainmri.predict", …) propagate to it.
    line_format = format_from_env()  # checked even when the operator's handlers are in use
    logger = app.logger
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    # Only Flask's own handler gets the line format: handlers an operator configured keep theirs.
    if default_handler in logger.handlers:
        default_handler.setFormatter(formatter(line_format))


def init_app(app: Flask) -> None:
    """Time every request and tag it with an id (echoed as X-Request-ID)."""
    configure_logger(app)
    app.before_request(_start_timer)
    app.after_request(_add_request_id)
