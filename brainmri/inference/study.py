"""A whole study screened slice by slice, and the measured rule that turns it into one answer.

Every slice takes the single upload's path (`guarded.classify_prepared`: the guard, temperature
calibration and the "uncertain" flag), in batches through the network. Blank slices
(`imaging.studies`) are reported and not scored; refused slices give no tumour probability.

The study answer: the mean tumour probability of the `k` most suspicious scored slices, "tumor"
at or above `threshold`. `k` and `threshold` were chosen on held-out patients
(`benchmarks/study_rule.py`; docs/studies.md has the figures): one slice alone is noisy, and
the mean of a few keeps one stray slice from deciding a study, while a tumour seen on a few
neighbouring slices still lifts it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..imaging import Study
from .guarded import Outcome
from .guarded import classify_prepared
from .modelcard import CLASSES

__all__ = [
    "BATCH",
    "DEFAULT_RULE",
    "SliceResult",
    "StudyResult",
    "StudyRule",
    "StudySummary",
    "STUDY_COLUMNS",
    "screen_study",
    "slice_csv_row",
    "summarise",
]

# Slices per forward pass: bounds the memory of one pass (a 400-slice study), same answers.
BATCH = 64
# How many slice indices `most_suspicious` lists.
MOST_SUSPICIOUS = 5


@dataclass(frozen=True)
class StudyRule:
    """Tumour when the mean tumour probability of the `k` most suspicious slices >= threshold."""

    k: int
    threshold: float

    @property
    def description(self) -> str:
        """The rule in words, for the page, the API and the CSV."""
        top = "the most suspicious slice" if self.k == 1 else f"the {self.k} most suspicious slices"
        return (f"any tumour when the mean tumour probability of {top} (refused and blank "
                f"slices left out) is at least {self.threshold:.2f}")

    def score(self, probabilities: Sequence[float]) -> float | None:
        """The study's tumour score from its scored slices' probabilities (None: none scored)."""
        if not probabilities:
            return None
        top = sorted(probabilities, reverse=True)[: self.k]
        return float(sum(top) / len(top))


# Chosen on the LGG validation patients of brainmri_cnn's split (every study found, fewest
# no-tumour proxy studies called tumour), reported on its LGG test and every BraTS patient
# (benchmarks/study_rule.py -> reports/study_rule.json, docs/studies.md). Rerun after retraining.
DEFAULT_RULE = StudyRule(k=3, threshold=0.7)


@dataclass(frozen=True)
class SliceResult:
    """One slice's answer in a study: a prediction, a refusal, blank, or unreadable."""

    index: int
    source: str
    outcome: Outcome | None  # None for a blank slice
    blank: bool = False

    @property
    def scored(self) -> bool:
        """True when the slice has a tumour probability (not blank, refused or unreadable)."""
        return self.outcome is not None and self.outcome.prediction is not None

    @property
    def refused(self) -> bool:
        """True when the guard (or the DICOM header) refused the slice."""
        return self.outcome is not None and self.outcome.refused

    @property
    def tumor_probability(self) -> float | None:
        """The slice's calibrated any-tumour probability, None when it was not scored."""
        return self.outcome.prediction.tumor_probability if self.scored else None

    @property
    def uncertain(self) -> bool:
        """True when the slice's top class is below the "uncertain" threshold."""
        return self.scored and self.outcome.prediction.uncertain

    @property
    def reason(self) -> str:
        """Why the slice has no class: blank, the refusal's reason or the decode error."""
        if self.blank:
            return "Blank or near-blank slice (little or no anatomy): not scored."
        if self.outcome is not None and self.outcome.error is not None:
            return self.outcome.message
        return ""

    @property
    def code(self) -> str:
        """A stable code for the slice's state: ok, blank, or the error's code."""
        if self.blank:
            return "blank"
        if self.outcome is not None and self.outcome.error is not None:
            return getattr(self.outcome.error, "code", "error")
        return "ok"

    def to_dict(self) -> dict[str, Any]:
        """The API's slice item (issue 34's shape, plus `blank` and `code`)."""
        prediction = self.outcome.prediction if self.scored else None
        return {
            "index": self.index,
            "source": self.source,
            "label": prediction.label if prediction else None,
            "probabilities": prediction.probabilities if prediction else None,
            "tumor_probability": prediction.tumor_probability if prediction else None,
            "uncertain": self.uncertain,
            "refused": self.refused,
            "blank": self.blank,
            "code": self.code,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class StudySummary:
    """The study's answer, the rule that gave it, and the most suspicious slices."""

    tumor_probability: float | None
    label: str  # "tumor", "no_tumor", or "no_answer" when no slice was scored
    most_suspicious: list[int]
    rule: str
    slices: int
    scored: int
    blank: int
    refused: int
    uncertain: int
    unreadable: int

    def to_dict(self) -> dict[str, Any]:
        """The API's summary block."""
        return {
            "tumor_probability": self.tumor_probability,
            "label": self.label,
            "most_suspicious": self.most_suspicious,
            "rule": self.rule,
            "counts": {"slices": self.slices, "scored": self.scored, "blank": self.blank,
                       "refused": self.refused, "uncertain": self.uncertain,
                       "unreadable": self.unreadable},
        }


@dataclass(frozen=True)
class StudyResult:
    """Every slice's result in study order, and the summary."""

    kind: str
    slices: list[SliceResult]
    summary: StudySummary

    def ranked(self) -> list[SliceResult]:
        """The scored slices, most suspicious first (ties: study order)."""
        scored = [s for s in self.slices if s.scored]
        return sorted(scored, key=lambda s: (-s.tumor_probability, s.index))


def summarise(slices: Sequence[SliceResult], rule: StudyRule = DEFAULT_RULE) -> StudySummary:
    """Apply the rule to a study's slice results."""
    scored = [s for s in slices if s.scored]
    ranked = sorted(scored, key=lambda s: (-s.tumor_probability, s.index))
    score = rule.score([s.tumor_probability for s in scored])
    if score is None:
        label = "no_answer"
    else:
        label = "tumor" if score >= rule.threshold else "no_tumor"
    return StudySummary(
        tumor_probability=score,
        label=label,
        most_suspicious=[s.index for s in ranked[:MOST_SUSPICIOUS]],
        rule=rule.description,
        slices=len(slices),
        scored=len(scored),
        blank=sum(s.blank for s in slices),
        refused=sum(s.refused for s in slices),
        uncertain=sum(s.uncertain for s in slices),
        unreadable=sum(s.outcome is not None and s.outcome.unreadable for s in slices),
    )


def screen_study(predictor, study: Study, uncertain_below: float, guard: bool = True,
                 rule: StudyRule = DEFAULT_RULE) -> StudyResult:
    """Screen every slice of a read study as a single upload, in batches; then summarise.

    Args:
        predictor: a `Predictor` (anything with `predict_checked_batch`).
        study: `imaging.read_study`'s slices, prepared for this predictor's input size.
        uncertain_below: top-class probabilities below this are flagged "uncertain".
        guard: False turns the out-of-distribution guard off (research use).
    """
    prepared = [(item.index, item.error if item.error is not None else item.scan)
                for item in study.slices if not item.blank]
    outcomes: dict[int, Outcome] = {}
    for start in range(0, len(prepared), BATCH):
        chunk = prepared[start : start + BATCH]
        results = classify_prepared(predictor, [scan for _, scan in chunk], uncertain_below,
                                    guard=guard)
        outcomes.update(zip((index for index, _ in chunk), results))
    slices = [SliceResult(item.index, item.source, outcomes.get(item.index), item.blank)
              for item in study.slices]
    return StudyResult(study.kind, slices, summarise(slices, rule))


# `brainmri predict` and the page's CSV download: one row per slice.
STUDY_COLUMNS = ["study", "slice_index", "source", "label", *CLASSES, "tumor_probability",
                 "uncertain", "refused", "blank", "reason"]


def slice_csv_row(study: str, item: SliceResult) -> list[str]:
    """One CSV row for a study's slice."""
    prediction = item.outcome.prediction if item.scored else None
    probabilities = ([f"{prediction.probabilities[c]:.6f}" for c in CLASSES] if prediction
                     else [""] * len(CLASSES))
    return [study, str(item.index), item.source, prediction.label if prediction else "",
            *probabilities, f"{prediction.tumor_probability:.6f}" if prediction else "",
            str(item.uncertain).lower(), str(item.refused).lower(), str(item.blank).lower(),
            item.reason]
