"""JSON API: classify slices, plus liveness and readiness probes (docs/openapi.yaml)."""

from __future__ import annotations

import base64
from typing import Any

from flask import Blueprint
from flask import current_app
from flask import jsonify
from flask import request
from flask.typing import ResponseReturnValue

from . import studies
from . import uploads
from .errors import UploadError
from ..imaging import ImageError
from .logs import log_batch
from .models import EXTENSION_KEY
from .models import card_url
from .models import REGISTRY_KEY
from ..inference import DISCLAIMER

__all__ = ["bp"]

bp = Blueprint("api", __name__)


@bp.post("/api/v1/predict")
def predict() -> ResponseReturnValue:
    """Classify the image in multipart field `file`; every class's probability and the disclaimer.

    :raise 400: missing field, empty, non-image or damaged file, or `unknown_model`
    :raise 413: body over MAX_CONTENT_LENGTH, or image over BRAINMRI_MAX_PIXELS
    :raise 415: extension not allowed, an image type other than PNG/JPEG/DICOM, or a DICOM
        compression with no decoder installed
    :raise 422: `not_brain_mri`, the input does not look like a brain MRI slice, or
        `wrong_modality`, a DICOM whose header names another modality than MR (no class given)
    :raise 503: the model is not available

    `model` (form field or query) picks one of the served models (GET /api/v1/models); the
    default is the best on the leakage-free test split. With `explain=true`, `explanation` holds the Grad-CAM heatmap of the
    predicted class as a base64 grey PNG of the model input's shape.
    """
    data = uploads.read_upload()
    result = uploads.classify(data, explain=_wants_explanation(), model=uploads.requested_model())
    body = result.prediction.to_dict()
    body["model"] = result.model
    if result.explanation is not None:
        from ..inference import heatmap_png

        heatmap = result.explanation.heatmap
        body["explanation"] = {
            "heatmap_png_base64": base64.b64encode(heatmap_png(heatmap)).decode("ascii"),
            "shape": list(heatmap.shape),
            "layer": result.explanation.layer,
            "label": result.explanation.label,
        }
    return jsonify(body)


def _wants_explanation() -> bool:
    value = request.form.get("explain", request.args.get("explain", ""))
    return value.strip().lower() in ("1", "true", "yes", "on")


@bp.post("/api/v1/predict/batch")
def predict_batch() -> ResponseReturnValue:
    """Classify up to BRAINMRI_BATCH_MAX_FILES images sent as repeated multipart field `files`.

    Each result carries the file's position (`index`, from 0) and either the prediction or the
    `error` that one file got, so one bad file never fails the others; filenames are never
    echoed. Every file takes the single upload's path (`inference.py`: screening, calibration,
    "uncertain" flag), all of them in one forward pass. The disclaimer and the model block are
    given once.

    :raise 400: no `files` part, or `unknown_model`
    :raise 413: more files than BRAINMRI_BATCH_MAX_FILES, or body over MAX_CONTENT_LENGTH
    :raise 503: the model is not available
    """
    files = uploads.read_batch(int(current_app.config["BRAINMRI_BATCH_MAX_FILES"]))
    model = uploads.requested_model()
    predictor = uploads.current_predictor(model)  # an unknown name fails the whole batch
    results: list[dict[str, Any] | None] = [None] * len(files)
    accepted: list[tuple[int, bytes]] = []
    for index, upload in enumerate(files):
        try:
            uploads.check_extension(upload.filename)
        except UploadError as error:
            results[index] = _item_error(index, error)
            continue
        accepted.append((index, upload.read()))
    outcomes = uploads.classify_batch([data for _, data in accepted], model=model)
    for (index, _), outcome in zip(accepted, outcomes):
        if outcome.error is not None:  # refusals (not_brain_mri, wrong_modality) included
            results[index] = _item_error(index, outcome.error)
            continue
        item = outcome.prediction.to_dict()
        del item["disclaimer"]  # once, at the top level
        results[index] = {"index": index, **item}
    log_batch(len(files), [item["error"]["code"] for item in results if "error" in item])
    return jsonify(results=results, model=predictor.card.summary, disclaimer=DISCLAIMER)


@bp.post("/api/v1/studies")
def studies_endpoint() -> ResponseReturnValue:
    """Screen a study sent as repeated multipart field `files` (web/studies.py, docs/studies.md).

    Every slice as a single upload, blank ones reported and not scored, and one summary with
    the rule that made it; slices are named by position, never by filename.

    :raise 400: no `files` part, a damaged archive or volume, a ZIP holding something else,
        or `unknown_model`
    :raise 413: over BRAINMRI_STUDY_MAX_SLICES, _BYTES or _PIXELS (the message names it)
    :raise 415: an extension a study does not take
    :raise 422: a DICOM set mixing series, or files of different kinds in one study
    :raise 503: the model is not available
    """
    return jsonify(studies.study_json())


def _item_error(index: int, error: UploadError | ImageError) -> dict[str, Any]:
    """One batch item's error body: its position, stable code and user-facing message."""
    return {"index": index, "error": {"code": error.code, "message": error.message}}


@bp.get("/healthz")
def healthz() -> ResponseReturnValue:
    """Liveness: the process answers HTTP (says nothing about the model)."""
    return jsonify(status="ok")


@bp.get("/api/v1/models")
def models() -> ResponseReturnValue:
    """The served models, the default first, with their leakage-free and official figures."""
    return jsonify(default=uploads.current_predictor().card.name,
                   models=[describe_model(p) for p in _served_predictors()])


def _served_predictors() -> list:
    registry = current_app.extensions.get(REGISTRY_KEY)
    if registry is not None:
        return [registry.get(name) for name in registry]
    return [uploads.current_predictor()]


def describe_model(predictor) -> dict[str, Any]:
    """A model's identity and headline figures from its metadata (no TensorFlow)."""
    raw = predictor.card.raw
    evaluation = raw.get("evaluation") or {}
    return {
        **predictor.card.summary,
        "arch": raw.get("arch", "cnn"),
        "architecture": raw.get("architecture", ""),
        "parameters": raw.get("parameters"),
        "input_size": predictor.input_size,
        "leakage_free_test": evaluation.get("test"),
        "official_test": evaluation.get("official_test"),
        "ready": predictor.ready,
        "card": card_url(predictor.card.name),
    }


@bp.get("/readyz")
def readyz() -> ResponseReturnValue:
    """Readiness: 200 once this process has loaded and warmed up every served model, 503 before."""
    predictors = current_app.extensions.get(EXTENSION_KEY) and _served_predictors()
    if not predictors or not all(predictor.ready for predictor in predictors):
        return jsonify(status="not_ready"), 503, {"Retry-After": "5"}
    return jsonify(status="ready", model=predictors[0].card.summary,
                   models=[predictor.card.name for predictor in predictors])
