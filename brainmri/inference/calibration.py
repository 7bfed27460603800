"""Temperature scaling and the "uncertain" threshold, fitted on the validation split (NumPy only).

The served network ends in a softmax, so its logits are not stored; log-probabilities stand in
for them. Softmax is shift-invariant, so softmax(log p / T) equals softmax(z / T) exactly for the
lost logits z, and temperature scaling loses nothing by working on log p.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "apply_temperature",
    "choose_uncertain_threshold",
    "fit_temperature",
    "log_probabilities",
    "negative_log_likelihood",
]

_EPS = 1e-12


def log_probabilities(probs: np.ndarray) -> np.ndarray:
    """log p, clipped away from -inf; usable as logits up to a per-row constant."""
    return np.log(np.clip(np.asarray(probs, np.float64), _EPS, 1.0))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax outputs (N, K) rescaled by 1/temperature; rows still sum to 1."""
    probs = np.asarray(probs, np.float64)
    if temperature == 1.0:
        return probs / probs.sum(axis=-1, keepdims=True)
    scaled = log_probabilities(probs) / float(temperature)
    scaled -= scaled.max(axis=-1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=-1, keepdims=True)


def negative_log_likelihood(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true labels."""
    # Not sklearn's log_loss: it clips at machine epsilon (not 1e-12), which would change the
    # recorded NLL of every over-confident mistake.
    picked = np.asarray(probs, np.float64)[np.arange(len(labels)), np.asarray(labels)]
    return float(-np.mean(np.log(np.clip(picked, _EPS, 1.0))))


def fit_temperature(probs: np.ndarray, labels: np.ndarray, low: float = 0.05,
                    high: float = 20.0) -> float:
    """The temperature in [low, high] that minimises the NLL of `labels` (golden-section on log T).

    NLL is convex in 1/T for a fixed set of logits, so the one-dimensional search finds the
    global minimum; a coarse grid first guards against a flat start. Kept rather than scipy's
    bounded Brent search, which stops at a different last digit than the recorded temperatures.
    """
    if len(labels) == 0:
        return 1.0

    def loss(log_t: float) -> float:
        return negative_log_likelihood(apply_temperature(probs, math.exp(log_t)), labels)

    grid = np.linspace(math.log(low), math.log(high), 41)
    best = int(np.argmin([loss(v) for v in grid]))
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    for _ in range(60):
        if loss(c) < loss(d):
            b = d
        else:
            a = c
        c, d = b - ratio * (b - a), a + ratio * (b - a)
    return float(math.exp((a + b) / 2))


def choose_uncertain_threshold(confidence: np.ndarray, correct: np.ndarray,
                               target_accuracy: float) -> dict[str, Any]:
    """Lowest top-class probability t such that predictions at or above t are right often enough.

    Predictions below t are flagged "uncertain". t is the smallest observed confidence whose
    accepted set (confidence >= t) reaches `target_accuracy` on the validation split; if none
    does, the highest confidence is used (nearly everything is flagged, which is the honest
    answer for such a model).

    Returns:
        {"uncertain_below", "target_accuracy", "coverage", "accuracy_confident",
         "accuracy_uncertain"} measured on the data given.
    """
    confidence = np.asarray(confidence, np.float64)
    correct = np.asarray(correct, bool)
    order = np.argsort(-confidence, kind="mergesort")
    conf_sorted, correct_sorted = confidence[order], correct[order]
    # Accuracy of the top-n most confident predictions, for every n.
    accuracy_top = np.cumsum(correct_sorted) / np.arange(1, len(order) + 1)
    threshold = float(conf_sorted[0]) if len(order) else 1.0
    for n in range(len(order), 0, -1):
        # Only cut between distinct confidences, so "confidence >= t" keeps exactly n items.
        if n < len(order) and conf_sorted[n] == conf_sorted[n - 1]:
            continue
        if accuracy_top[n - 1] >= target_accuracy:
            threshold = float(conf_sorted[n - 1])
            break
    threshold = min(threshold, 1.0)
    confident = confidence >= threshold
    return {
        "uncertain_below": round(threshold, 6),
        "target_accuracy": target_accuracy,
        "coverage": round(float(confident.mean()), 4) if len(confidence) else None,
        "accuracy_confident": round(float(correct[confident].mean()), 4) if confident.any() else None,
        "accuracy_uncertain": round(float(correct[~confident].mean()), 4) if (~confident).any() else None,
    }
