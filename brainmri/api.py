"""JSON API: classify one slice, plus liveness and readiness probes (see docs/openapi.yaml)."""

from __future__ import annotations

from flask import Blueprint
from flask import current_app
from flask import jsonify
from flask.typing import ResponseReturnValue

from . import uploads
from .predictor import EXTENSION_KEY

__all__ = ["bp"]

bp = Blueprint("api", __name__)


@bp.post("/api/v1/predict")
def predict() -> ResponseReturnValue:
    """Classify the image in multipart field `file`; every class's probability and the disclaimer.

    :raise 400: missing field, empty, non-image or damaged file
    :raise 413: body over MAX_CONTENT_LENGTH, or image over BRAINMRI_MAX_PIXELS
    :raise 415: extension not allowed, or an image type other than PNG/JPEG
    :raise 503: the model is not available
    """
    data = uploads.read_upload()
    result = uploads.classify(data)
    body = result.prediction.to_dict()
    body["model"] = uploads.current_predictor().card.summary
    return jsonify(body)


@bp.get("/healthz")
def healthz() -> ResponseReturnValue:
    """Liveness: the process answers HTTP (says nothing about the model)."""
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz() -> ResponseReturnValue:
    """Readiness: 200 once this process has loaded and warmed up the model, 503 before."""
    predictor = current_app.extensions.get(EXTENSION_KEY)
    if predictor is None or not predictor.ready:
        return jsonify(status="not_ready"), 503, {"Retry-After": "5"}
    return jsonify(status="ready", model=predictor.card.summary)
