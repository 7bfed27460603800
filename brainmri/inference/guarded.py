"""File bytes to a guarded, calibrated, "uncertain"-flagged prediction or a refusal, in batches.

The one path the result page, the JSON API (single and batch) and `brainmri predict` all take,
so a file gets the same answer wherever it is sent: decode and preprocess each file once
(`Predictor.prepare_scan`: the network's input, and the colour and peak brightness the guard
checks), one forward pass for every file that decoded, the out-of-distribution guard on each
(`Predictor.predict_checked_batch`), temperature calibration, and the "uncertain" flag against
the model's fitted threshold. No Flask: web/uploads.py wraps it for requests
(model choice, config default, logging) and cli.py for folders of files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..imaging import ImageError
from ..imaging import Scan
from .modelcard import CLASSES
from .predictor import Prediction

__all__ = [
    "PREDICT_COLUMNS",
    "REFUSAL_CODES",
    "Outcome",
    "classify_many",
    "classify_one",
    "classify_prepared",
    "csv_row",
    "is_refusal",
    "uncertain_threshold",
]

# ImageError codes that mean "usable file, but not a brain MRI slice": a refusal, not a failure.
REFUSAL_CODES = frozenset({"not_brain_mri", "wrong_modality"})


def is_refusal(error: BaseException | None) -> bool:
    """True when `error` says the file was readable but is not a brain MRI slice."""
    return isinstance(error, ImageError) and error.code in REFUSAL_CODES


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
        return is_refusal(self.error)

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
                  isolate: bool = False) -> list[Outcome]:
    """Classify several files' bytes with one forward pass; one outcome per file, in order.

    Args:
        predictor: a `Predictor` (or anything with `prepare_scan` and `predict_checked_batch`).
        files: each file's bytes.
        uncertain_below: top-class probabilities below this are flagged "uncertain".
        guard: False turns the out-of-distribution guard off (research use); a DICOM header
            naming another modality is still refused, since that is read, not estimated.
        isolate: also turn unexpected exceptions from decoding into that file's error, so a
            batch tool goes on with the other files (the web side lets them become a 500).
    """
    prepared: list[Scan | Exception] = []
    for data in files:
        try:
            prepared.append(predictor.prepare_scan(data))  # the file's one decode
        except ImageError as error:
            prepared.append(error)
        except Exception as error:
            if not isolate:
                raise
            prepared.append(error)
    return classify_prepared(predictor, prepared, uncertain_below, guard=guard, isolate=isolate)


def classify_prepared(predictor, prepared: Sequence[Scan | Exception], uncertain_below: float,
                      guard: bool = True, isolate: bool = False) -> list[Outcome]:
    """`classify_many` for files prepared elsewhere (raybatch.py's Ray tasks).

    Args:
        prepared: each file's `predictor.prepare_scan` result, or the exception it raised. The
            outcome is decided here either way, so both paths give the same answers.
        uncertain_below, guard, isolate: as for `classify_many`; without `isolate` an
            unexpected (not ImageError) exception is raised again.
    """
    outcomes: list[Outcome | None] = [None] * len(prepared)
    ready: list[int] = []
    scans: list[Scan] = []
    for index, item in enumerate(prepared):
        if isinstance(item, Exception):
            if not (isolate or isinstance(item, ImageError)):
                raise item
            outcomes[index] = Outcome(error=item)
            continue
        ready.append(index)
        scans.append(item)
    results = (predictor.predict_checked_batch([scan.model_input for scan in scans],
                                               [scan.colourfulness for scan in scans], guard=guard,
                                               peaks=[scan.peak_brightness for scan in scans])
               if scans else [])
    for index, scan, result in zip(ready, scans, results):
        if isinstance(result, Prediction):
            # The predictor has already flagged atypical inputs; a low probability adds to that.
            flagged = replace(result, uncertain=result.uncertain
                              or result.confidence < uncertain_below)
            outcomes[index] = Outcome(prediction=flagged, model_input=scan.model_input)
        else:  # the guard's NotBrainMRI refusal
            outcomes[index] = Outcome(model_input=scan.model_input, error=result)
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
