"""PNG plots for an evaluation report (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..inference import CLASSES
from .metrics import confusion_counts
from .metrics import roc_curve

__all__ = ["pyplot", "reliability", "write_all"]


def pyplot():
    """matplotlib.pyplot on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _confusion(plt, path: Path, name: str, y: np.ndarray, probs: np.ndarray) -> None:
    k = len(CLASSES)
    matrix = confusion_counts(y, probs.argmax(1), np.arange(k))
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    ax.imshow(matrix, cmap="Blues")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center",
                    color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    ax.set_xticks(range(k), CLASSES, rotation=30, ha="right")
    ax.set_yticks(range(k), CLASSES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix: {name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _roc(plt, path: Path, name: str, y: np.ndarray, probs: np.ndarray) -> None:
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    for i, cls in enumerate(CLASSES):
        if (y == i).any() and (y != i).any():
            fpr, tpr, auc = roc_curve(y == i, probs[:, i])
            ax.plot(fpr, tpr, label=f"{cls} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title(f"One-vs-rest ROC: {name}")
    if ax.get_legend_handles_labels()[0]:  # a set with one class only has no curve to name
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _confidence(plt, path: Path, name: str, y: np.ndarray, probs: np.ndarray) -> None:
    confidence = probs.max(1)
    correct = probs.argmax(1) == y
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    bins = np.linspace(0.25, 1.0, 16)
    ax.hist([confidence[correct], confidence[~correct]], bins=bins, stacked=True,
            label=["correct", "wrong"], color=["#3a7d44", "#c0392b"])
    ax.set_xlabel("top-class probability")
    ax.set_ylabel("images")
    ax.set_title(f"Confidence: {name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _reliability(plt, path: Path, name: str, y: np.ndarray, probs: np.ndarray, bins: int = 10) -> None:
    confidence = probs.max(1)
    correct = probs.argmax(1) == y
    # The ECE's bins, with counts; sklearn's calibration_curve puts edge values in the lower bin.
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    centres, accuracy, counts = [], [], []
    for b in range(bins):
        mask = which == b
        if mask.any():
            centres.append(confidence[mask].mean())
            accuracy.append(correct[mask].mean())
            counts.append(int(mask.sum()))
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="perfect calibration")
    ax.plot(centres, accuracy, marker="o", label="model")
    for x, acc, n in zip(centres, accuracy, counts):
        ax.annotate(str(n), (x, acc), textcoords="offset points", xytext=(0, 6), fontsize=7,
                    ha="center")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("mean confidence in bin")
    ax.set_ylabel("accuracy in bin")
    ax.set_title(f"Reliability: {name}")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _history(plt, path: Path, history: dict) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    epochs = np.arange(1, len(history.get("loss", [])) + 1)
    for key, ax in (("loss", left), ("accuracy", right)):
        if key in history:
            ax.plot(epochs, history[key], label=f"train {key}")
        if f"val_{key}" in history:
            ax.plot(epochs, history[f"val_{key}"], label=f"validation {key}")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        if ax.get_legend_handles_labels()[0]:  # a history without this key has no curve to name
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reliability(path: Path, name: str, y: np.ndarray, probs: np.ndarray) -> None:
    """Write one reliability diagram (accuracy against confidence per bin) to `path`."""
    plt = pyplot()
    _reliability(plt, path, name, y, probs)


def write_all(out_dir: Path, curves: dict[str, tuple[np.ndarray, np.ndarray]],
              history: dict | None) -> list[str]:
    """Write every plot for every evaluation set; return the file names."""
    plt = pyplot()
    written = []
    for name, (y, probs) in curves.items():
        for kind, draw in (("confusion", _confusion), ("roc", _roc),
                           ("confidence", _confidence), ("reliability", _reliability)):
            filename = f"{kind}_{name}.png"
            draw(plt, out_dir / filename, name, y, probs)
            written.append(filename)
    if history:
        _history(plt, out_dir / "training_curves.png", history)
        written.append("training_curves.png")
    return written
