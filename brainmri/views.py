"""Server-rendered pages: the upload form and the result page (they work with JavaScript off)."""

from __future__ import annotations

import base64

import cv2
import numpy as np
from flask import Blueprint
from flask import current_app
from flask import render_template
from flask.typing import ResponseReturnValue

from . import uploads
from .errors import size_limit_text
from .modelcard import CLASSES
from .predictor import DISCLAIMER

__all__ = ["CLASS_NAMES", "bp"]

bp = Blueprint("pages", __name__)

# How each class is named to people (the API keeps the machine names).
CLASS_NAMES = {
    "glioma": "Glioma",
    "meningioma": "Meningioma",
    "no_tumor": "No tumor",
    "pituitary": "Pituitary tumor",
}


def preview_data_uri(model_input: np.ndarray) -> str:
    """PNG data URI of the array the network saw, encoded in memory (nothing is written to disk)."""
    pixels = np.clip(model_input[..., 0] * 255.0 + 0.5, 0, 255).astype(np.uint8)
    ok, encoded = cv2.imencode(".png", pixels)
    if not ok:
        raise RuntimeError("PNG encoding of the preview failed")
    return "data:image/png;base64," + base64.b64encode(encoded.tobytes()).decode("ascii")


def _upload_limits() -> dict[str, str]:
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    return {
        "accept": uploads.ACCEPT,
        "max_bytes": str(limit or ""),
        "max_size": size_limit_text(limit),
    }


@bp.app_context_processor
def inject_disclaimer() -> dict[str, str]:
    """Every page, error pages included, carries the disclaimer in its footer."""
    return {"disclaimer": DISCLAIMER}


@bp.app_template_filter("percent")
def percent(value: float) -> str:
    """Format a probability in [0, 1] as a percentage with one decimal ("62.5%")."""
    return f"{value * 100:.1f}%"


@bp.app_template_global("class_name")
def class_name(label: str) -> str:
    """Human-readable name of a class."""
    return CLASS_NAMES.get(label, label)


@bp.get("/")
def index() -> ResponseReturnValue:
    """Show the upload form."""
    return render_template("upload.html", classes=CLASSES, **_upload_limits())


@bp.post("/predict")
def predict() -> ResponseReturnValue:
    """Classify the uploaded slice and show every class's confidence with the disclaimer."""
    result = uploads.classify(uploads.read_upload())
    # Only the model's input is shown back, re-encoded in memory; the upload itself is dropped.
    return render_template(
        "result.html",
        prediction=result.prediction,
        preview=preview_data_uri(result.model_input),
        input_size=result.model_input.shape[0],
        model=uploads.current_predictor().card.summary,
    )
