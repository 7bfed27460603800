"""Classification figures for an evaluation set: accuracy, per-class and any-tumour figures, ROC, ECE.

Pure functions of labels and probabilities (NumPy); plots.py, evaluation.py, trust.py and
comparison.py share them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..inference import CLASSES

__all__ = [
    "binary_metrics",
    "classification_metrics",
    "expected_calibration_error",
    "roc_curve",
]


def roc_curve(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """False-positive rates, true-positive rates and the AUC for one-vs-rest scores."""
    positive = np.asarray(positive, bool)
    order = np.argsort(-scores, kind="mergesort")
    scores, positive = scores[order], positive[order]
    # Only keep the last point of tied scores so ties do not fake a staircase.
    distinct = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tps = np.cumsum(positive)[distinct]
    fps = (distinct + 1) - tps
    n_pos, n_neg = positive.sum(), (~positive).sum()
    tpr = np.r_[0.0, tps / n_pos] if n_pos else np.zeros(len(tps) + 1)
    fpr = np.r_[0.0, fps / n_neg] if n_neg else np.zeros(len(fps) + 1)
    auc = float(np.trapezoid(tpr, fpr)) if n_pos and n_neg else float("nan")
    return fpr, tpr, auc


def expected_calibration_error(correct: np.ndarray, confidence: np.ndarray, bins: int = 15) -> float:
    """ECE: the confidence-vs-accuracy gap averaged over equal-width confidence bins."""
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
    k = len(classes)
    confusion = np.zeros((k, k), dtype=int)
    np.add.at(confusion, (y_true, y_pred), 1)
    per_class = {}
    f1s = []
    for i, name in enumerate(classes):
        tp = confusion[i, i]
        predicted, actual = confusion[:, i].sum(), confusion[i, :].sum()
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        _, _, auc = roc_curve(y_true == i, probs[:, i])
        # Recall is undefined for a class absent from the set: None, not a misleading 0.
        per_class[name] = {"precision": round(float(precision), 4),
                           "recall": round(float(recall), 4) if actual else None,
                           "f1": round(float(f1), 4), "support": int(actual),
                           "auc": None if np.isnan(auc) else round(auc, 4)}
        if actual:
            f1s.append(f1)
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
    positives, negatives = int(tumor_true.sum()), int((~tumor_true).sum())
    found, cleared = int((tumor_true & tumor_pred).sum()), int((~tumor_true & ~tumor_pred).sum())
    return {
        "tumor_images": positives,
        "no_tumor_images": negatives,
        "sensitivity": round(found / positives, 4) if positives else None,
        "specificity": round(cleared / negatives, 4) if negatives else None,
    }
