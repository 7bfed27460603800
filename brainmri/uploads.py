"""From a multipart upload to a prediction: the work the result page and the JSON API share.

The uploaded bytes stay in memory (security.InMemoryRequest) and are dropped after the request.
The client's filename is consulted only for its extension and is never stored, shown or logged.
The real type is decided by the magic bytes and the decoder in imaging.py, not by the extension
or the Content-Type header (OWASP File Upload Cheat Sheet).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from flask import current_app
from flask import request

from .errors import UploadError
from .logs import log_prediction
from .modelcard import ModelError
from .predictor import EXTENSION_KEY
from .predictor import Prediction
from .predictor import Predictor

__all__ = [
    "ACCEPT",
    "ALLOWED_EXTENSIONS",
    "FIELD",
    "Classified",
    "classify",
    "current_predictor",
    "read_upload",
]

FIELD = "file"
ALLOWED_EXTENSIONS = (".png", ".jpg", ".jpeg")
ACCEPT = ",".join((*ALLOWED_EXTENSIONS, "image/png", "image/jpeg"))  # <input accept=...>


@dataclass(frozen=True)
class Classified:
    """A prediction together with the exact array the network saw (for the result page)."""

    prediction: Prediction
    model_input: np.ndarray


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
    extension = os.path.splitext(upload.filename or "")[1].lower()
    if extension and extension not in ALLOWED_EXTENSIONS:
        raise UploadError(
            "unsupported_type",
            "Only PNG and JPEG images (.png, .jpg, .jpeg) are accepted.",
            415,
        )
    return data


def current_predictor() -> Predictor:
    """The app's predictor, or ModelError (-> 503) when the app was built without a model."""
    predictor = current_app.extensions.get(EXTENSION_KEY)
    if predictor is None:
        raise ModelError("No model is configured for this app (BRAINMRI_SKIP_MODEL is set).")
    return predictor


def classify(data: bytes) -> Classified:
    """Preprocess and classify uploaded bytes, loading the model on first use (dev server).

    Raises:
        ImageError: the bytes are not a usable image (mapped to 400/413/415 by errors.py).
        ModelError: the model cannot be loaded (503).
    """
    predictor = current_predictor()
    model_input = predictor.prepare(data)
    prediction = predictor.predict(model_input)
    log_prediction(data, prediction.label)
    return Classified(prediction, model_input)
