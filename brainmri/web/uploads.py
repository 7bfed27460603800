"""From a multipart upload to a prediction: the work the result page and the JSON API share.

The classification itself (guard, calibration, "uncertain" flag) is `inference/guarded.py`'s,
the path `brainmri predict` takes too; this module adds the request side: the model a request
names, the app's configured default threshold, the log line and the metrics (each classified
file counted once: a class, or a refusal by its code, here for the page, the API and the batch).

The uploaded bytes stay in memory (security.InMemoryRequest) and are dropped after the request.
The client's filename is consulted only for its extension and is never stored, shown or logged.
The real type is decided by the magic bytes and the decoder in imaging/, not by the extension
or the Content-Type header (OWASP File Upload Cheat Sheet).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flask import current_app
from flask import request
from werkzeug.datastructures import FileStorage
from werkzeug.exceptions import RequestEntityTooLarge

from .. import inference
from .errors import UploadError
from ..imaging import ImageError
from ..inference import Outcome
from .logs import log_prediction
from .metrics import record_prediction
from .metrics import record_refusal
from .models import EXTENSION_KEY
from .models import REGISTRY_KEY
from .models import load_predictor
from ..inference import ModelError
from ..inference import Explanation
from ..inference import Prediction
from ..inference import Predictor
from ..inference import UnknownModel

__all__ = [
    "ACCEPT",
    "ALLOWED_EXTENSIONS",
    "BATCH_FIELD",
    "FIELD",
    "MODEL_FIELD",
    "Classified",
    "check_extension",
    "classify",
    "classify_batch",
    "current_predictor",
    "read_batch",
    "read_upload",
    "requested_model",
    "uncertain_below",
]

FIELD = "file"
MODEL_FIELD = "model"
BATCH_FIELD = "files"
ALLOWED_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm")
# <input accept=...>; browsers report .dcm files as application/dicom (or with no type at all).
ACCEPT = ",".join((*ALLOWED_EXTENSIONS, "image/png", "image/jpeg", "application/dicom"))


@dataclass(frozen=True)
class Classified:
    """A prediction together with the exact array the network saw (for the result page)."""

    prediction: Prediction
    model_input: np.ndarray
    explanation: Explanation | None = None
    model: dict[str, str] | None = None  # the answering model's name, version, sha256


def read_upload(field: str = FIELD) -> bytes:
    """Return the bytes of the uploaded file in `field`.

    Raises:
        UploadError: the field is missing (400 `missing_file`) or the extension is not allowed
            (415 `unsupported_type`). Files without an extension are accepted; content decides.
        RequestEntityTooLarge: the body is over MAX_CONTENT_LENGTH (413).
    """
    upload = request.files.get(field)
    data = upload.read() if upload is not None else b""
    # Browsers send an empty part with filename="" when no file was chosen.
    if upload is None or (not upload.filename and not data):
        raise UploadError(
            "missing_file",
            f"No file was uploaded. Send the image as multipart/form-data in a field "
            f"named '{field}'.",
            400,
        )
    check_extension(upload.filename)
    return data


def check_extension(filename: str | None) -> None:
    """Refuse a filename whose extension is not allowed; no extension is fine (content decides).

    Raises:
        UploadError: 415 `unsupported_type`.
    """
    extension = os.path.splitext(filename or "")[1].lower()
    if extension and extension not in ALLOWED_EXTENSIONS:
        raise UploadError(
            "unsupported_type",
            "Only PNG, JPEG and DICOM files (.png, .jpg, .jpeg, .dcm) are accepted.",
            415,
        )


def read_batch(max_files: int, field: str = BATCH_FIELD) -> list[FileStorage]:
    """Return the file parts of a batch upload, in the order they were sent (not yet read).

    The request's form-part limit is raised to `max_files` + 2 for this request only, so the
    app-wide MAX_FORM_PARTS can stay small for the single-file endpoints.

    Raises:
        UploadError: no `field` part (400 `missing_file`) or more than `max_files`
            (413 `too_many_files`).
        RequestEntityTooLarge: body over MAX_CONTENT_LENGTH or a part flood (413).
    """
    request.max_form_parts = max_files + 2
    try:
        uploads = request.files.getlist(field)
    except RequestEntityTooLarge:
        # A body within MAX_CONTENT_LENGTH was stopped by the part counter: too many files,
        # which is what the client needs to hear (not "larger than 20 MB").
        length, limit = request.content_length, request.max_content_length
        if length is None or limit is None or length > limit:
            raise
        raise _too_many_files(max_files) from None
    if not uploads:
        raise UploadError(
            "missing_file",
            f"No file was uploaded. Send the images as multipart/form-data, each in a part "
            f"named '{field}'.",
            400,
        )
    if len(uploads) > max_files:
        raise _too_many_files(max_files)
    return uploads


def _too_many_files(max_files: int) -> UploadError:
    return UploadError(
        "too_many_files",
        f"At most {max_files} files can be sent in one batch request; split the batch.",
        413,
    )


def requested_model() -> str | None:
    """The model a request names in its `model` form field or query argument, if any."""
    name = request.form.get(MODEL_FIELD) or request.args.get(MODEL_FIELD) or ""
    return name.strip() or None


def current_predictor(name: str | None = None) -> Predictor:
    """The predictor called `name` (default: the app's default model).

    Raises:
        ModelError: the app was built without a model (503).
        UploadError: 400 `unknown_model`, no served model has that name.
    """
    registry = current_app.extensions.get(REGISTRY_KEY)
    if registry is not None:
        try:
            return registry.get(name)
        except UnknownModel as error:
            raise UploadError(error.code, error.message, error.status) from None
    predictor = current_app.extensions.get(EXTENSION_KEY)
    if predictor is None:
        raise ModelError("No model is configured for this app (BRAINMRI_SKIP_MODEL is set).")
    if name and name != predictor.card.name:  # a single injected predictor (tests, tools)
        error = UnknownModel(name, [predictor.card.name])
        raise UploadError(error.code, error.message, error.status)
    return predictor


def uncertain_below(predictor=None) -> float:
    """The fitted "uncertain" threshold from the model metadata, else BRAINMRI_UNCERTAIN_BELOW."""
    return inference.uncertain_threshold(predictor or current_predictor(),
                                         current_app.config["BRAINMRI_UNCERTAIN_BELOW"])


def classify(data: bytes, explain: bool = False, model: str | None = None) -> Classified:
    """Preprocess, screen (is it a brain MRI?) and classify uploaded bytes, calibrated.

    The model loads on first use (dev server). With `explain`, a Grad-CAM heatmap of the
    predicted class comes along.

    Raises:
        ImageError: the bytes are not a usable image (mapped to 400/413/415 by errors.py), or a
            refusal (422, no class given): `NotBrainMRI` from the out-of-distribution guard, or
            `wrong_modality`, a DICOM whose header names another modality than MR.
        ModelError: the model cannot be loaded (503).
    """
    predictor = current_predictor(model)
    load_predictor(predictor)  # a no-op under gunicorn; timed on the dev server's first use
    name = predictor.card.name
    try:
        prediction, model_input = inference.classify_one(predictor, data,
                                                         uncertain_below(predictor))
    except ImageError as error:
        if inference.is_refusal(error):
            record_refusal(name, error.code)
        raise
    explanation = predictor.explain(model_input, prediction.label) if explain else None
    record_prediction(name, prediction)  # once the answer is complete, as the log line
    log_prediction(data, prediction.label)
    return Classified(prediction, model_input, explanation, predictor.card.summary)


def classify_batch(files: Sequence[bytes], model: str | None = None) -> list[Outcome]:
    """Classify several uploads' bytes in one forward pass; one outcome per file, in order.

    Raises:
        ModelError: the model cannot be loaded (503).
        UploadError: 400 `unknown_model`.
    """
    predictor = current_predictor(model)
    load_predictor(predictor)
    outcomes = inference.classify_many(predictor, files, uncertain_below(predictor))
    name = predictor.card.name
    for data, outcome in zip(files, outcomes):
        if outcome.prediction is not None:
            record_prediction(name, outcome.prediction)
            log_prediction(data, outcome.prediction.label)
        elif outcome.refused:
            record_refusal(name, outcome.error.code)
    return outcomes
