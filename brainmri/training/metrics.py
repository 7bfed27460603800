"""Classification figures for an evaluation set: accuracy, per-class and any-tumour figures, ROC, ECE.

Pure functions of labels and probabilities that plots.py, evaluation.py, trust.py and
comparison.py share. The counting (confusion matrices, precision/recall/F1, ROC points, AUC) is
scikit-learn's, imported inside the functions so `brainmri --help` stays fast; only the expected
calibration error is written here, because scikit-learn has none.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..inference import CLASSES

__all__ = [
    "binary_metrics",
    "classification_metrics",
    "confusion_counts",
    "expected_calibration_error",
    "roc_curve",
]


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray, labels) -> np.ndarray:
    """Confusion matrix over `labels`, rows true and columns predicted; zeros for no samples."""
    if len(y_true) == 0:  # scikit-learn refuses empty input; an empty set counts nothing
        return np.zeros((len(labels), len(labels)), dtype=int)
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(y_true, y_pred, labels=labels)


def roc_curve(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """False-positive rates, true-positive rates and the AUC for one-vs-rest scores.

    One point per distinct score (ties are one step, not a staircase), from (0, 0). With only
    one class present there is no curve: ([0], [0], nan).
    """
    positive = np.asarray(positive, bool)
    if positive.all() or not positive.any():
        return np.zeros(1), np.zeros(1), float("nan")
    from sklearn.metrics import auc
    from sklearn.metrics import roc_curve as sklearn_roc_curve

    # drop_intermediate=False keeps every distinct score, as the plots have always drawn them.
    fpr, tpr, _ = sklearn_roc_curve(positive, scores, drop_intermediate=False)
    return fpr, tpr, float(auc(fpr, tpr))


def expected_calibration_error(correct: np.ndarray, confidence: np.ndarray, bins: int = 15) -> float:
    """ECE: the confidence-vs-accuracy gap averaged over equal-width confidence bins."""
    # Written here: scikit-learn has no ECE (calibration_curve gives per-bin means, no weights).
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(ece)


def classification_metrics(y_true: np.ndarray, probs: np.ndarray,
                           classes: tuple[str, ...] = CLASSES) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1, macro-F1, confusion matrix, AUCs and ECE."""
    y_true = np.asarray(y_true)
    y_pred = probs.argmax(axis=1)
    labels = np.arange(len(classes))
    confusion = confusion_counts(y_true, y_pred, labels)
    precision, recall, f1 = np.zeros((3, len(classes)))
    if len(y_true):
        from sklearn.metrics import precision_recall_fscore_support

        # zero_division=0: a class never predicted has precision 0 (and F1 0), with no warning.
        precision, recall, f1, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=labels, zero_division=0.0)
    per_class = {}
    f1s = []
    for i, name in enumerate(classes):
        actual = int(confusion[i, :].sum())
        _, _, auc = roc_curve(y_true == i, probs[:, i])
        # Recall is undefined for a class absent from the set: None, not a misleading 0.
        per_class[name] = {"precision": round(float(precision[i]), 4),
                           "recall": round(float(recall[i]), 4) if actual else None,
                           "f1": round(float(f1[i]), 4), "support": actual,
                           "auc": None if np.isnan(auc) else round(auc, 4)}
        if actual:
            f1s.append(f1[i])
    confidence = probs.max(axis=1)
    correct = y_pred == y_true
    no_tumor = classes.index("no_tumor")
    tumor_true = y_true != no_tumor
    tumor_pred = y_pred != no_tumor
    return {
        "images": int(len(y_true)),
        "accuracy": round(float(correct.mean()), 4) if len(y_true) else None,
        "macro_f1": round(float(np.mean(f1s)), 4) if f1s else None,
        "tumor_vs_no_tumor_accuracy": round(float((tumor_true == tumor_pred).mean()), 4)
        if len(y_true) else None,
        "per_class": per_class,
        "confusion_matrix": {"classes": list(classes), "rows_true_cols_predicted": confusion.tolist()},
        "mean_confidence": round(float(confidence.mean()), 4) if len(y_true) else None,
        "ece": round(expected_calibration_error(correct, confidence), 4) if len(y_true) else None,
    }


def binary_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """Any tumour against no tumour: sensitivity, specificity and their counts (None if absent)."""
    no_tumor = CLASSES.index("no_tumor")
    tumor_true = np.asarray(y_true) != no_tumor
    tumor_pred = np.asarray(probs).argmax(1) != no_tumor
    cleared, false_alarms, missed, found = (
        int(n) for n in confusion_counts(tumor_true, tumor_pred, [False, True]).ravel())
    positives, negatives = found + missed, cleared + false_alarms
    return {
        "tumor_images": positives,
        "no_tumor_images": negatives,
        "sensitivity": round(found / positives, 4) if positives else None,
        "specificity": round(cleared / negatives, 4) if negatives else None,
    }
