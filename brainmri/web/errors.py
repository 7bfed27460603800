"""Every error the app answers with, mapped to HTTP in one place: JSON for /api, HTML otherwise.

Messages come from fixed tables or from `ImageError`/`UploadError`, whose messages are written to
be shown to users. Exception text, tracebacks, file paths and upload filenames never reach a
response; unexpected errors are logged server-side with the request id and answered with 500.
"""

from __future__ import annotations

import logging

from flask import Flask
from flask import Response
from flask import current_app
from flask import jsonify
from flask import render_template
from flask import request
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException

from ..imaging import ImageError
from .logs import request_id
from ..inference import ModelError

__all__ = ["IMAGE_ERROR_STATUS", "UploadError", "init_app", "respond", "size_limit_text"]

# The name it had before the web/ package, so log configuration that names it still works.
log = logging.getLogger("brainmri.errors")

# ImageError.code -> HTTP status.
IMAGE_ERROR_STATUS = {
    "empty_file": 400,
    "not_an_image": 400,
    "corrupt_image": 400,
    "unsupported_type": 415,
    "image_too_large": 413,
    "multi_frame": 400,
    "not_brain_mri": 422,  # decoded fine, but the OOD guard says it is not a brain MRI slice
    # A refusal like not_brain_mri, only certain: the DICOM header names another modality (CT, …).
    "wrong_modality": 422,
    # Studies (web/studies.py): the whole upload is refused, its message names the limit.
    "bad_archive": 400,
    "mixed_series": 422,
    "mixed_study": 422,
    "too_many_slices": 413,
    "study_too_large": 413,
}

# Status -> (code, title, message) for HTTP errors raised by Flask/Werkzeug themselves.
_HTTP_ERRORS = {
    400: ("bad_request", "Bad request", "The request could not be understood."),
    404: ("not_found", "Page not found", "There is nothing at this address."),
    405: ("method_not_allowed", "Method not allowed", "This address does not accept that method."),
    413: ("payload_too_large", "Upload too large", None),  # message names the configured limit
    415: ("unsupported_media_type", "Unsupported file type", "Upload a PNG, JPEG or DICOM image."),
    429: ("rate_limited", "Too many requests", "Too many requests from this address."),
}

_TITLES = {
    400: "The upload could not be used",
    413: "Upload too large",
    415: "Unsupported file type",
    422: "This does not look like a brain MRI",
    500: "Something went wrong",
    503: "The model is not available",
}

# What the HTML error page suggests doing next.
_NEXT_STEPS = {
    400: "Go back to the upload page and choose a PNG, JPEG or DICOM brain MRI slice.",
    404: "Go to the upload page to analyse a scan.",
    413: "Go back and choose a smaller image, or export the slice at a lower resolution.",
    415: "Go back and choose a PNG, JPEG or uncompressed DICOM image (.png, .jpg, .jpeg or "
    ".dcm).",
    429: "Wait a little, then go back to the upload page and try again.",
    500: "Try again in a moment. If it keeps happening, tell the people who run this service "
    "and quote the request id below.",
    503: "The model is still loading or is not installed. Try again in a minute.",
}

# More specific advice for some codes.
_NEXT_STEPS_BY_CODE = {
    "missing_file": "Go back to the upload page, choose an image, then press Analyse scan.",
    "invalid_form_token": "Go back to the upload page, reload it, and submit the form again.",
    "not_brain_mri": "Go back and upload a grey-scale MRI slice of the head. Photos, other "
    "kinds of scan (CT, X-ray), colour images and inverted or cut-out slices are refused.",
    "multi_frame": "Export the single slice you want analysed from your viewer or PACS, then "
    "upload that file.",
    "mixed_series": "Go back and send the files of one DICOM series at a time.",
    "mixed_study": "Go back and send one NIfTI volume, one ZIP archive, or the slices themselves.",
    "bad_archive": "Go back and send a ZIP that holds only the study's PNG, JPEG or DICOM slices.",
    "too_many_slices": "Go back and send fewer slices, or split the study.",
    "study_too_large": "Go back and send a smaller study, or split it.",
    "wrong_modality": "Go back and upload a slice from an MR series of the head. CT, X-ray, "
    "ultrasound, PET and other kinds of scan are refused.",
}


class UploadError(Exception):
    """The upload request is unusable; `message` is safe to show to the user.

    `code` is stable and machine-readable (`missing_file`, `unsupported_type`,
    `invalid_form_token`); `status` is the HTTP status to answer with.
    """

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


def size_limit_text(limit: int | None) -> str:
    """Human-readable size limit, e.g. "20 MB"."""
    if not limit:
        return "the size limit"
    mib = limit / (1024 * 1024)
    if mib >= 1:
        return f"{mib:g} MB"
    return f"{limit / 1024:g} KB"


def _wants_json() -> bool:
    """API clients get JSON; the blueprint is unset for unmatched URLs, so check the path too."""
    return request.blueprint == "api" or request.path.startswith("/api/")


def respond(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> Response:
    """Render one error as JSON (`{"error": {"code", "message"}}`) or as the HTML error page."""
    if _wants_json():
        response = jsonify(error={"code": code, "message": message})
    else:
        response = current_app.make_response(
            render_template(
                "error.html",
                status=status,
                code=code,
                title=_TITLES.get(status) or _HTTP_ERRORS.get(status, (None, "Error"))[1],
                message=message,
                next_step=_NEXT_STEPS_BY_CODE.get(code)
                or _NEXT_STEPS.get(status, _NEXT_STEPS[400]),
                request_id=request_id(),
            )
        )
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _log_rejection(status: int, code: str) -> None:
    log.info(
        "rejected request_id=%s path=%s status=%d code=%s",
        request_id(), request.path, status, code,
    )


def handle_upload_error(error: UploadError) -> ResponseReturnValue:
    """A request the upload code refused (missing field, extension, form token)."""
    _log_rejection(error.status, error.code)
    return respond(error.status, error.code, error.message)


def handle_image_error(error: ImageError) -> ResponseReturnValue:
    """Bytes that are not a usable image; the status depends on the reason."""
    status = IMAGE_ERROR_STATUS.get(error.code, 400)
    _log_rejection(status, error.code)
    return respond(status, error.code, error.message)


def handle_model_error(error: ModelError) -> ResponseReturnValue:
    """The model cannot serve; its message may contain paths, so it stays in the log."""
    log.error("model unavailable request_id=%s: %s", request_id(), error)
    return respond(
        503,
        "model_unavailable",
        "The model is not available right now. Try again in a minute.",
        headers={"Retry-After": "30"},
    )


def handle_http_exception(error: HTTPException) -> ResponseReturnValue:
    """Errors Werkzeug raises itself (404, 405, 413 body too large, …) in our format."""
    if error.code is None or error.code < 400:
        return error
    status = error.code
    code, _, message = _HTTP_ERRORS.get(
        status, (f"http_{status}", "Error", "The request could not be completed.")
    )
    if status == 413:
        limit = size_limit_text(current_app.config.get("MAX_CONTENT_LENGTH"))
        message = f"The upload is larger than {limit}. Choose a smaller image."
    headers = {}
    if status == 405 and getattr(error, "valid_methods", None):
        headers["Allow"] = ", ".join(error.valid_methods)
    retry_after = getattr(error, "retry_after", None)
    if status == 429 and isinstance(retry_after, int):
        # ratelimit.py computes it from the client's bucket; the message repeats it for people.
        headers["Retry-After"] = str(retry_after)
        message = f"{message} Retry in {retry_after} s."
    if status >= 500:
        log.error("http error request_id=%s status=%d", request_id(), status)
    else:
        _log_rejection(status, code)
    return respond(status, code, message, headers)


def handle_unexpected(error: Exception) -> ResponseReturnValue:
    """Anything else: log the traceback here, send the client only a generic message."""
    log.exception("unhandled error request_id=%s path=%s", request_id(), request.path)
    return respond(
        500,
        "internal_error",
        f"An unexpected error occurred (request id {request_id()}). Nothing was stored.",
    )


def init_app(app: Flask) -> None:
    """Register the handlers on the app, so they also cover URLs no blueprint matched."""
    app.register_error_handler(UploadError, handle_upload_error)
    app.register_error_handler(ImageError, handle_image_error)
    app.register_error_handler(ModelError, handle_model_error)
    app.register_error_handler(HTTPException, handle_http_exception)
    app.register_error_handler(Exception, handle_unexpected)
