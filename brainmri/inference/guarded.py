"""File bytes to a guarded, calibrated, "uncertain"-flagged prediction or a refusal, in batches.

The one path the result page, the JSON API (single and batch) and `brainmri predict` all take,
so a file gets the same answer wherever it is sent: decode and preprocess each file
(`Predictor.prepare`), one forward pass for every file that decoded, the out-of-distribution
guard on each (`Predictor.predict_checked_batch`), temperature calibration, and the "uncertain"
flag against the model's fitted threshold. No Flask: uploads.py wraps it for requests (model
choice, config default, logging) and cli.py for folders of files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..imaging import ImageError
from .modelcard import CLASSES
from .predictor import Prediction

__all__ = [
    "PREDICT_COLUMNS",
    "REFUSAL_CODES",
    "Outcome",
    "classify_many",
    "classify_one",
    "csv_row",
    "uncertain_threshold",
]

# ImageError codes that mean "usable file, but not a brain MRI slice": a refusal, not a failure.
REFUSAL_CODES = frozenset({"not_brain_mri", "wrong_modality"})


@dataclass(frozen=True)
class Outcome:
    """What one file came to: a prediction, or the error that stopped it (never both)."""

    prediction: Prediction | None = None
    model_input: np.ndarray | None = None  # what the network saw (None if decoding failed)
    # An ImageError (refusals included), or with `isolate` any failure to decode.
    error: Exception | None = None

    @property
    def refused(self) -> bool:
        """True when the file was readable but is not a brain MRI slice (no class is given)."""
        return isinstance(self.error, ImageError) and self.error.code in REFUSAL_CODES

    @property
    def unreadable(self) -> bool:
        """True when the file could not be used as an image at all."""
        return self.error is not None and not self.refused

    @property
    def message(self) -> str:
        """The error's user-facing message; an unexpected failure shows only its type."""
        if self.error is None:
            return ""
        if isinstance(self.error, ImageError):
            return self.error.message
        return f"The file could not be used ({type(self.error).__name__})."


def uncertain_threshold(predictor, default: float) -> float:
    """The model's fitted "uncertain" threshold (metadata, `brainmri calibrate`), else `default`."""
    fitted = getattr(predictor, "uncertain_below", None)
    return float(default if fitted is None else fitted)


def classify_many(predictor, files: Sequence[bytes], uncertain_below: float, guard: bool = True,
                  isolate: bool = False,
                  prepared: Sequence[np.ndarray | Exception] | None = None) -> list[Outcome]:
    """Classify several files' bytes with one forward pass; one outcome per file, in order.

    Args:
        predictor: a `Predictor` (or anything with `prepare` and `predict_checked_batch`).
        files: each file's bytes.
        uncertain_below: top-class probabilities below this are flagged "uncertain".
        guard: False turns the out-of-distribution guard off (research use); a DICOM header
            naming another modality is still refused, since that is read, not estimated.
        isolate: also turn unexpected exceptions from decoding into that file's error, so a
            batch tool goes on with the other files (the web side lets them become a 500).
        prepared: each file's `predictor.prepare` result, or the exception it raised, when
            that ran elsewhere (raybatch.py's Ray tasks); None prepares here. Either way the
            outcome is decided below, so both give the same answers.
    """
    outcomes: list[Outcome | None] = [None] * len(files)
    ready: list[int] = []
    images: list[np.ndarray] = []
    for index, data in enumerate(files):
        try:
            if prepared is None:
                image = predictor.prepare(data)
            elif isinstance(prepared[index], Exception):
                raise prepared[index]
            else:
                image = prepared[index]
            images.append(image)
        except ImageError as error:
            outcomes[index] = Outcome(error=error)
            continue
        except Exception as error:
            if not isolate:
                raise
            outcomes[index] = Outcome(error=error)
            continue
        ready.append(index)
    results = (predictor.predict_checked_batch(images, [files[i] for i in ready], guard=guard)
               if images else [])
    for index, image, result in zip(ready, images, results):
        if isinstance(result, Prediction):
            flagged = replace(result, uncertain=result.confidence < uncertain_below)
            outcomes[index] = Outcome(prediction=flagged, model_input=image)
        else:  # the guard's NotBrainMRI refusal
            outcomes[index] = Outcome(model_input=image, error=result)
    return outcomes


def classify_one(predictor, data: bytes, uncertain_below: float,
                 guard: bool = True) -> tuple[Prediction, np.ndarray]:
    """Classify one file's bytes; return the prediction and the array the network saw.

    Raises:
        ImageError: the bytes are not a usable image, or a refusal (`NotBrainMRI`,
            `wrong_modality`): no class is given.
    """
    outcome = classify_many(predictor, [data], uncertain_below, guard=guard)[0]
    if outcome.error is not None:
        raise outcome.error
    return outcome.prediction, outcome.model_input


# The CSV that `brainmri predict` writes, the same from the plain and the Ray engine.
PREDICT_COLUMNS = ["path", "label", "confidence", *CLASSES, "tumor_probability", "error",
                   "refused", "reason", "uncertain"]


def csv_row(path: Path, outcome: Outcome) -> list[str]:
    """One `brainmri predict` row: a prediction, a refusal (no class, refused=true) or an error."""
    prediction = outcome.prediction
    if prediction is not None:
        return [str(path), prediction.label, f"{prediction.confidence:.6f}",
                *(f"{prediction.probabilities[c]:.6f}" for c in CLASSES),
                f"{prediction.tumor_probability:.6f}", "", "false", "",
                "true" if prediction.uncertain else "false"]
    no_class = [""] * (len(CLASSES) + 3)  # label, confidence, probabilities, tumor_probability
    if outcome.refused:
        return [str(path), *no_class, "", "true", outcome.message, ""]
    return [str(path), *no_class, outcome.message, "false", "", ""]
