"""Measure a trained model: metrics, calibration and plots for each evaluation set.

Evaluation sets come from the split manifest written by `brainmri train`: the leakage-free
`test` split, the `val` split, the official Testing folder, and the part of that folder that
has no near-duplicate in anything the model trained or validated on (`official_test_novel`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import dedup
from .dataset import CachedDataset
from .dataset import load_dataset
from .modelcard import CLASSES

__all__ = [
    "EvalSet",
    "classification_metrics",
    "eval_sets",
    "evaluate",
    "expected_calibration_error",
    "predict_canonical",
    "roc_curve",
    "splits_path_for",
]


def splits_path_for(model_path: Path) -> Path:
    """The split manifest written beside a model (`<stem>.splits.json`)."""
    return Path(model_path).with_suffix(".splits.json")


@dataclass(frozen=True)
class EvalSet:
    """A named subset of the data set to evaluate on."""

    name: str
    indices: np.ndarray
    description: str


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


def eval_sets(data: CachedDataset, manifest: dict | None) -> list[EvalSet]:
    """The evaluation sets of `data` given a split manifest (or the folders, without one)."""
    index = {path: i for i, path in enumerate(data.paths)}
    sets: list[EvalSet] = []
    if manifest:
        splits = {name: np.array([index[p] for p in paths if p in index], dtype=int)
                  for name, paths in manifest["splits"].items()}
        seen = np.concatenate([splits.get("train", np.array([], int)), splits.get("val", np.array([], int))])
        if "test" in splits:
            sets.append(EvalSet("test", splits["test"],
                                "leakage-free test split: no near-duplicate group shared with train or val"))
        if "val" in splits:
            sets.append(EvalSet("val", splits["val"], "validation split (used for early stopping)"))
        if "official_test" in splits:
            official = splits["official_test"]
            groups = dedup.group_near_duplicates(data.hashes, manifest.get("group_distance",
                                                                           dedup.DEFAULT_MAX_DISTANCE))
            seen_groups = set(groups[seen].tolist())
            novel = np.array([i for i in official if groups[i] not in seen_groups], dtype=int)
            sets.append(EvalSet("official_test", official, "the data set's own Testing folder"))
            sets.append(EvalSet("official_test_novel", novel,
                                "Testing-folder images with no near-duplicate in train or val"))
        return sets
    official = np.array([i for i, s in enumerate(data.sources) if s == "test"], dtype=int)
    if len(official):
        sets.append(EvalSet("official_test", official, "the data set's Testing folder"))
        rest = np.array([i for i, s in enumerate(data.sources) if s != "test"], dtype=int)
        if len(rest):
            sets.append(EvalSet("training_folder", rest, "the data set's Training folder"))
    else:
        sets.append(EvalSet("all", np.arange(len(data.paths)), "every labelled image under --data"))
    return sets


def predict_canonical(predictor, images: np.ndarray, batch: int = 128) -> np.ndarray:
    """Uncalibrated softmax in batches, columns in the canonical class order."""
    outputs = [predictor.predict_arrays(images[i : i + batch]) for i in range(0, len(images), batch)]
    raw = np.concatenate(outputs) if outputs else np.zeros((0, len(predictor.labels)))
    # Reorder the model's outputs into the canonical class order.
    return raw[:, [predictor.labels.index(name) for name in CLASSES]]


def evaluate(model_path: Path, data_root: Path, out_dir: Path, cache_dir: Path | None = None,
             progress=None) -> dict[str, Any]:
    """Evaluate `model_path` on `data_root`, write metrics.json and plots into `out_dir`."""
    from . import plots
    from .predictor import Predictor

    predictor = Predictor.from_path(model_path)
    predictor.load()
    data = load_dataset(data_root, predictor.input_size, cache_dir=cache_dir, progress=progress)
    manifest_path = splits_path_for(model_path)
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    y = data.label_indices
    report: dict[str, Any] = {
        "model": predictor.card.summary,
        "data": data.root.name,
        "split_manifest": manifest_path.name if manifest else None,
        "sets": {},
    }
    curves = {}
    sets = eval_sets(data, manifest)
    for eval_set in sets:
        if len(eval_set.indices) == 0:
            continue
        # The served (temperature-calibrated) probabilities; `trust` compares with the raw ones.
        probs = predictor.calibrate(predict_canonical(predictor, data.images[eval_set.indices]))
        metrics = classification_metrics(y[eval_set.indices], probs)
        metrics["description"] = eval_set.description
        report["sets"][eval_set.name] = metrics
        curves[eval_set.name] = (y[eval_set.indices], probs)
    history_path = Path(model_path).with_suffix(".history.json")
    history = json.loads(history_path.read_text()) if history_path.is_file() else None
    report["plots"] = plots.write_all(out_dir, curves, history)
    from .trust import evaluate_trust

    report["trust"] = evaluate_trust(predictor, data, {s.name: s.indices for s in sets}, out_dir)
    report["plots"] += [name for name in ("reliability_test_before_calibration.png",
                                          "reliability_test_after_calibration.png")
                        if (out_dir / name).is_file()]
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
