"""Server-rendered pages: the upload form and the result page (they work with JavaScript off)."""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping

import cv2
import numpy as np
from flask import Blueprint
from flask import abort
from flask import current_app
from flask import render_template
from flask.typing import ResponseReturnValue

from . import uploads
from .descriptions import CLASS_DESCRIPTIONS
from .descriptions import CLASS_NAMES
from .errors import size_limit_text
from .models import REGISTRY_KEY
from .models import card_url
from .models import model_card_path
from ..inference import legend_data_uri
from ..inference import overlay_data_uri
from ..inference import CLASSES
from ..inference import ModelError
from ..inference import DISCLAIMER
from ..inference import leakage_free_score

__all__ = ["CLASS_NAMES", "bp", "is_uncertain", "model_choices", "rounded_percentages"]

bp = Blueprint("pages", __name__)


def preview_data_uri(model_input: np.ndarray) -> str:
    """PNG data URI of the array the network saw, encoded in memory (nothing is written to disk)."""
    pixels = np.clip(model_input[..., 0] * 255.0 + 0.5, 0, 255).astype(np.uint8)
    ok, encoded = cv2.imencode(".png", pixels)
    if not ok:
        raise RuntimeError("PNG encoding of the preview failed")
    return "data:image/png;base64," + base64.b64encode(encoded.tobytes()).decode("ascii")


def rounded_percentages(probabilities: Mapping[str, float], decimals: int = 1) -> dict[str, float]:
    """Percentages rounded so that they add up to exactly 100 (largest-remainder rounding).

    Rounding each value on its own can show 99.9% or 100.1% in total, which a reader checking
    the bars would rightly distrust; the shift never exceeds one unit in the last decimal.
    """
    scale = 10**decimals
    total = sum(probabilities.values()) or 1.0
    exact = {name: value / total * 100 * scale for name, value in probabilities.items()}
    units = {name: math.floor(value) for name, value in exact.items()}
    short = 100 * scale - sum(units.values())
    by_remainder = sorted(exact, key=lambda name: exact[name] - units[name], reverse=True)
    for name in by_remainder[:short]:
        units[name] += 1
    return {name: units[name] / scale for name in probabilities}


def is_uncertain(confidence: float) -> bool:
    """True when the top class is too weak to present as a finding.

    The threshold is the one fitted on validation data and stored in the model metadata
    (`brainmri calibrate`), else BRAINMRI_UNCERTAIN_BELOW.
    """
    return confidence < uploads.uncertain_below()


def _uncertain_below_or_default() -> float:
    """The upload page's threshold: the model's fitted one when a model is configured."""
    try:
        return uploads.uncertain_below()
    except ModelError:
        return float(current_app.config["BRAINMRI_UNCERTAIN_BELOW"])


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


@bp.app_template_filter("percentage")
def percentage(value: float) -> str:
    """Format a value that is already a percentage with one decimal ("62.5%")."""
    return f"{value:.1f}%"


@bp.app_template_global("class_name")
def class_name(label: str) -> str:
    """Human-readable name of a class."""
    return CLASS_NAMES.get(label, label)


def model_choices() -> list[dict[str, str]]:
    """The served models for the page's selector, the default first, labelled with their figures."""
    registry = current_app.extensions.get(REGISTRY_KEY)
    if registry is None:
        return []
    choices = []
    for name in registry:
        raw = registry.get(name).card.raw
        accuracy, _ = leakage_free_score(raw)
        figure = f"{accuracy:.1%} on the leakage-free test split" if accuracy >= 0 else "not evaluated"
        label = f"{name} ({raw.get('arch', 'cnn')}): {figure}"
        if name == registry.default:
            label += ", default"
        choices.append({"name": name, "label": label})
    return choices


@bp.get("/favicon.ico")
def favicon() -> ResponseReturnValue:
    """The brand icon where browsers look for it without a <link> (JSON and error responses)."""
    return current_app.send_static_file("favicon.ico")


@bp.get("/")
def index() -> ResponseReturnValue:
    """Show the upload form (with a model selector when several models are served)."""
    return render_template(
        "upload.html",
        classes=CLASSES,
        uncertain_below=_uncertain_below_or_default(),
        models=model_choices(),
        model_field=uploads.MODEL_FIELD,
        **_upload_limits(),
    )


@bp.post("/predict")
def predict() -> ResponseReturnValue:
    """Classify the uploaded slice and show every class's confidence with the disclaimer."""
    model = uploads.requested_model()
    result = uploads.classify(uploads.read_upload(), explain=True, model=model)
    prediction = result.prediction
    percentages = rounded_percentages(prediction.probabilities)
    # Only the model's input is shown back, re-encoded in memory; the upload itself is dropped.
    return render_template(
        "result.html",
        prediction=prediction,
        percentages=percentages,
        tumor_percentage=round(100 - percentages["no_tumor"], 1),
        uncertain=prediction.uncertain,
        uncertain_below=uploads.uncertain_below(uploads.current_predictor(model)),
        reliability=(uploads.current_predictor(model).card.raw.get("reliability") or {}).get("worst"),
        description=CLASS_DESCRIPTIONS.get(prediction.label, ""),
        preview=preview_data_uri(result.model_input),
        heatmap=overlay_data_uri(result.explanation.heatmap) if result.explanation else None,
        heatmap_legend=legend_data_uri() if result.explanation else None,
        heatmap_layer=result.explanation.layer if result.explanation else None,
        input_size=result.model_input.shape[0],
        model=result.model,
        model_card=card_url(result.model["name"]) if result.model else None,
    )


@bp.get("/models/<name>/card")
def model_card(name: str) -> ResponseReturnValue:
    """A served model's card, the Markdown that `brainmri docs` generates, as plain text."""
    path = model_card_path(name)
    if path is None:
        abort(404, "No model card for that model.")
    return path.read_text(encoding="utf-8"), 200, {"Content-Type": "text/plain; charset=utf-8"}
