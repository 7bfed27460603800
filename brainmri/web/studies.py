"""Study view: several slices, a ZIP, a DICOM series or a NIfTI volume, screened as one study.

`POST /api/v1/studies` answers JSON; `GET /studies` is the upload form and `POST /studies` the
result page (plain multi-file form, works with JavaScript off). Reading the study is imaging's
(`read_study`), screening and the summary rule inference's (`screen_study`); this module adds the
request side: the study's own body and part limits (a typical MR series is 50-150 MB, far over
the single upload's 20 MB), metrics, one log line, and the page.

Nothing is written to disk (security.InMemoryRequest) and no filename or patient tag is logged
or echoed: slices are named by position only.
"""

from __future__ import annotations

import base64
import csv
import io
import logging
import os
from urllib.parse import quote

import cv2
import numpy as np
from flask import Blueprint
from flask import current_app
from flask import render_template
from flask import request
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import RequestEntityTooLarge

from . import uploads
from .errors import UploadError
from .logs import elapsed_ms
from .logs import request_id
from .metrics import record_prediction
from .metrics import record_refusal
from .metrics import record_study
from .models import load_predictor
from .views import preview_data_uri
from ..imaging import StudyLimits
from ..imaging import read_study
from ..inference import DEFAULT_RULE
from ..inference import DISCLAIMER
from ..inference import ModelError
from ..inference import STUDY_COLUMNS
from ..inference import StudyResult
from ..inference import overlay_data_uri
from ..inference import screen_study
from ..inference import slice_csv_row

__all__ = ["FIELD", "STUDY_EXTENSIONS", "bp", "run_study", "study_json", "study_limits"]

bp = Blueprint("studies", __name__)
log = logging.getLogger("brainmri.predict")

FIELD = "files"
STUDY_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm", ".zip", ".nii", ".gz")
STUDY_ACCEPT = ",".join((*STUDY_EXTENSIONS, "image/png", "image/jpeg", "application/dicom",
                         "application/zip", "application/gzip"))
_CLUTTER = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
# Room in the body for the multipart boundaries and headers of every part.
_ENVELOPE = 1024 * 1024


def study_limits() -> StudyLimits:
    """The configured limits on one study (BRAINMRI_STUDY_MAX_*)."""
    config = current_app.config
    return StudyLimits(max_slices=int(config["BRAINMRI_STUDY_MAX_SLICES"]),
                       max_bytes=int(config["BRAINMRI_STUDY_MAX_BYTES"]),
                       max_pixels=int(config["BRAINMRI_STUDY_MAX_PIXELS"]))


@bp.url_value_preprocessor
def _page_request_limits(endpoint: str | None, values: dict | None) -> None:
    """The study page's limits, set before anything parses the form.

    URL value preprocessors run before every before_request hook, the form-token check (which
    reads the form) included, so the app-wide 20 MB and 10-part limits never see a study.
    """
    if request.method == "POST":
        set_request_limits()


def set_request_limits() -> None:
    """Give this request a study's body and part limits instead of the single upload's."""
    limits = study_limits()
    request.max_content_length = limits.max_bytes + _ENVELOPE
    # Every file, the form token, the model choice, and one spare part: so the file-count check
    # below, not the part counter, refuses one file too many, with its own message.
    request.max_form_parts = limits.max_slices + 4


def _read_files() -> list[tuple[str | None, bytes]]:
    """The study's files as (client filename, bytes); the names only order the slices.

    Raises:
        UploadError: no file (400 `missing_file`), an extension not accepted (415
            `unsupported_type`), more files than BRAINMRI_STUDY_MAX_SLICES (413
            `too_many_slices`) or a body over BRAINMRI_STUDY_MAX_BYTES (413 `study_too_large`).
    """
    limits = study_limits()
    set_request_limits()  # the API's form is first parsed here (it has no form token)
    try:
        parts = [part for part in request.files.getlist(FIELD) if part.filename or part.content_length]
        files = [(part.filename, part.read()) for part in parts]
    except RequestEntityTooLarge:
        raise _body_too_large(limits) from None
    # Operating-system clutter a folder upload brings along is dropped, as in a ZIP.
    files = [(name, data) for name, data in files
             if (name or data) and os.path.basename((name or "").replace("\\", "/")) not in _CLUTTER]
    if not files:
        raise UploadError("missing_file", "No file was uploaded. Send the study's files as "
                          f"multipart/form-data, each in a part named '{FIELD}'.", 400)
    if len(files) > limits.max_slices:
        raise UploadError("too_many_slices", f"The study has {len(files)} files; the limit is "
                          f"{limits.max_slices} slices a study (BRAINMRI_STUDY_MAX_SLICES).", 413)
    for name, _ in files:
        lower = (name or "").lower()
        extension = os.path.splitext(lower)[1]
        if extension and extension not in STUDY_EXTENSIONS:
            raise UploadError("unsupported_type", "A study takes PNG, JPEG or DICOM slices, a ZIP "
                              "of them, or a NIfTI volume (.png, .jpg, .jpeg, .dcm, .zip, .nii, "
                              ".nii.gz).", 415)
    return files


def _body_too_large(limits: StudyLimits) -> UploadError:
    """The body broke a request limit: the part count (too many files) or the byte size."""
    length = request.content_length or 0
    if length and length <= (request.max_content_length or 0):
        return UploadError("too_many_slices", "The study has more files than the limit of "
                           f"{limits.max_slices} slices a study (BRAINMRI_STUDY_MAX_SLICES).", 413)
    return UploadError("study_too_large", f"The study is larger than "
                       f"{limits.max_bytes / 2**20:g} MB, the limit (BRAINMRI_STUDY_MAX_BYTES).", 413)


def run_study() -> tuple[StudyResult, dict[str, str]]:
    """Read, screen and summarise the uploaded study; count it and log one line.

    Raises:
        UploadError, ImageError: the study as a whole was refused (errors.py maps the code).
        ModelError: the model cannot be loaded (503).
    """
    files = _read_files()
    model = uploads.requested_model()
    predictor = uploads.current_predictor(model)
    load_predictor(predictor)
    study = read_study(files, predictor.input_size, study_limits())
    del files  # the bytes are not needed past decoding
    result = screen_study(predictor, study, uploads.uncertain_below(predictor))
    name = predictor.card.name
    for item in result.slices:
        if item.scored:
            record_prediction(name, item.outcome.prediction)
        elif item.refused:
            record_refusal(name, item.outcome.error.code)
    summary = result.summary
    record_study(name, result.kind, summary)
    log.info("study request_id=%s kind=%s slices=%d scored=%d blank=%d refused=%d label=%s "
             "latency_ms=%.1f", request_id(), result.kind, summary.slices, summary.scored,
             summary.blank, summary.refused, summary.label, elapsed_ms())
    return result, predictor.card.summary


def study_json() -> dict:
    """The API's body for the uploaded study (api.py's POST /api/v1/studies)."""
    result, model = run_study()
    return {"slices": [item.to_dict() for item in result.slices],
            "summary": result.summary.to_dict(), "kind": result.kind, "model": model,
            "disclaimer": DISCLAIMER}


@bp.get("/studies")
def study_form() -> ResponseReturnValue:
    """The study upload form (plain multi-file input; a folder where the browser allows it)."""
    limits = study_limits()
    return render_template("study_upload.html", accept=STUDY_ACCEPT, limits=limits,
                           max_mb=f"{limits.max_bytes / 2**20:g}", field=FIELD)


@bp.post("/studies")
def study_page() -> ResponseReturnValue:
    """The study result: summary and disclaimer, the probability plot, slices most suspicious
    first (each with its full single-slice result further down), and a CSV download."""
    result, model = run_study()
    shown = int(current_app.config["BRAINMRI_STUDY_DETAILED_SLICES"])
    ranked = result.ranked()
    detailed = ranked[:shown]
    heatmaps = _heatmaps(detailed)
    cards = [_card(item, heatmaps.get(item.index)) for item in detailed]
    return render_template(
        "study_result.html",
        result=result,
        summary=result.summary,
        cards=cards,
        others=ranked[shown:],
        unscored=[item for item in result.slices if not item.scored],
        plot=probability_plot(result),
        csv_uri="data:text/csv;charset=utf-8," + quote(study_csv(result)),
        uncertain_below=uploads.uncertain_below(uploads.current_predictor(uploads.requested_model())),
        model=model,
    )


def _heatmaps(items) -> dict[int, str]:
    """Grad-CAM overlays of the predicted class for the detailed slices, one batched pass."""
    if not items:
        return {}
    predictor = uploads.current_predictor(uploads.requested_model())
    try:
        if hasattr(predictor, "gradcam_batch"):
            images = np.stack([item.outcome.model_input for item in items])
            classes = np.array([predictor.labels.index(item.outcome.prediction.label)
                                for item in items])
            cams = list(predictor.gradcam_batch(images, classes))
        else:  # a predictor without the batched form (test doubles, tools)
            cams = [predictor.explain(item.outcome.model_input, item.outcome.prediction.label).heatmap
                    for item in items]
    except ModelError:  # a model with no conv layer: the page goes on without heatmaps
        return {}
    return {item.index: overlay_data_uri(cam) for item, cam in zip(items, cams)}


def _card(item, heatmap: str | None) -> dict:
    """What the page shows of one detailed slice."""
    from .views import rounded_percentages

    prediction = item.outcome.prediction
    percentages = rounded_percentages(prediction.probabilities)
    return {"item": item, "prediction": prediction, "percentages": percentages,
            "tumor_percentage": round(100 - percentages["no_tumor"], 1),
            "preview": preview_data_uri(item.outcome.model_input), "heatmap": heatmap,
            "size": item.outcome.model_input.shape[0]}


def study_csv(result: StudyResult) -> str:
    """One row per slice in study order, then the summary row (the page's CSV download)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(STUDY_COLUMNS)
    for item in result.slices:
        writer.writerow(slice_csv_row("upload", item))
    summary = result.summary
    writer.writerow(["upload", "summary", summary.rule, summary.label, *[""] * 4,
                     "" if summary.tumor_probability is None else f"{summary.tumor_probability:.6f}",
                     "", "", "", "most suspicious: " + " ".join(map(str, summary.most_suspicious))])
    return out.getvalue()


def probability_plot(result: StudyResult, width: int = 720, height: int = 220) -> dict:
    """Geometry of the server-rendered SVG: tumour probability along the slice axis.

    Scored slices are joined by a line (breaks where slices were not scored); uncertain slices
    get a hollow marker, refused ones a cross at the bottom, blank ones a grey tick.
    """
    left, right, top, bottom = 44, 12, 12, 34
    count = max(len(result.slices), 1)
    span_x = width - left - right
    span_y = height - top - bottom

    def x(index: int) -> float:
        return round(left + (index + 0.5) * span_x / count, 1)

    def y(value: float) -> float:
        return round(top + (1.0 - value) * span_y, 1)

    segments, current = [], []
    points, uncertain, refused, blank = [], [], [], []
    for item in result.slices:
        if item.scored:
            point = (x(item.index), y(item.tumor_probability))
            current.append(point)
            (uncertain if item.uncertain else points).append(
                {"x": point[0], "y": point[1], "index": item.index,
                 "p": item.tumor_probability})
            continue
        if len(current) > 1:  # a lone scored slice between gaps is a dot, not a line
            segments.append(" ".join(f"{a},{b}" for a, b in current))
        current = []
        marker = {"x": x(item.index), "y": y(0.0), "index": item.index}
        (blank if item.blank else refused).append(marker)
    if len(current) > 1:
        segments.append(" ".join(f"{a},{b}" for a, b in current))
    threshold = None
    if result.summary.tumor_probability is not None:
        threshold = y(DEFAULT_RULE.threshold)
    ticks = sorted({0, count - 1, *range(0, count, max(1, (count // 8) or 1))})
    return {"width": width, "height": height, "left": left, "top": top,
            "plot_width": span_x, "plot_height": span_y, "bottom": top + span_y,
            "segments": segments, "points": points, "uncertain": uncertain, "refused": refused,
            "blank": blank, "threshold_y": threshold,
            "y_ticks": [{"y": y(v), "label": f"{int(v * 100)}%"} for v in (0.0, 0.5, 1.0)],
            "x_ticks": [{"x": x(i), "label": str(i)} for i in ticks if i < count]}
