"""Fit and measure the trust layer: temperature scaling, the "uncertain" threshold, the OOD guard.

`calibrate` fits everything on the validation split (the guard's class centroids on the
training split) and stores it in the model metadata; `evaluate_trust` measures it on the
leakage-free test split, the official Testing folder and the OOD test images of `ood_sets`.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from . import calibration
from . import ood
from . import ood_sets
from .dataset import CachedDataset
from .dataset import load_datasets
from .imaging import ImageError
from .modelcard import CLASSES
from .modelcard import metadata_path_for

__all__ = ["calibrate", "evaluate_trust", "measure_images", "ood_test_images"]


def _canonical(predictor, probs: np.ndarray) -> np.ndarray:
    return probs[:, [predictor.labels.index(name) for name in CLASSES]]


def measure_images(predictor, images: np.ndarray, raw: list[bytes | None], batch: int = 128):
    """Uncalibrated softmax (canonical order), pooled features and cheap features of inputs."""
    probs, embeddings = [], []
    for start in range(0, len(images), batch):
        p, e = predictor.forward(images[start : start + batch])
        probs.append(p)
        embeddings.append(e)
    probs_all = _canonical(predictor, np.concatenate(probs)) if probs else np.zeros((0, len(CLASSES)))
    emb_all = np.concatenate(embeddings) if embeddings else np.zeros((0, 0))
    cheap = [ood.image_features(image, data) for image, data in zip(images, raw)]
    features = {name: np.array([row[name] for row in cheap]) for name in (cheap[0] if cheap else {})}
    return probs_all, emb_all, features


def _split_indices(data: CachedDataset, manifest: dict) -> dict[str, np.ndarray]:
    from .evaluation import manifest_splits

    index = {path: i for i, path in enumerate(data.paths)}
    return {name: np.array([index[p] for p in paths if p in index], dtype=int)
            for name, paths in manifest_splits(manifest).items()}


def _read(data: CachedDataset, indices: np.ndarray) -> list[bytes]:
    return [data.file(i).read_bytes() for i in indices]


def _fit_exposure(predictor, data: CachedDataset, train: np.ndarray, train_emb: np.ndarray,
                  train_features: dict[str, np.ndarray]) -> tuple[ood.Exposure, dict[str, Any]]:
    """The outlier-exposure head: training-split slices against altered copies of them.

    The negatives go through `predictor.prepare`, the one preprocessing path, like an upload.
    """
    greys = []
    for i in train:
        grey = cv2.imdecode(np.frombuffer(data.file(i).read_bytes(), np.uint8),
                            cv2.IMREAD_GRAYSCALE)
        if grey is not None:
            greys.append(grey)
    inputs = []
    for png in ood_sets.exposure_negatives(greys):
        try:
            inputs.append(predictor.prepare(png))
        except ImageError:
            continue
    _, neg_emb, neg_features = measure_images(predictor, np.stack(inputs), [None] * len(inputs))
    exposure = ood.fit_exposure(ood.Exposure.inputs(train_emb, train_features),
                                ood.Exposure.inputs(neg_emb, neg_features))
    return exposure, {"positives": "train split", "images": int(len(inputs)),
                      "kinds": "a 20-45 % patch and an inversion of every training slice"}


def calibrate(model_path: Path, data_root: Path | list[Path], cache_dir: Path | None = None,
              target_accuracy: float = 0.98, progress=None) -> dict[str, Any]:
    """Fit temperature, uncertain threshold and OOD guard; write them into the model metadata.

    Args:
        model_path: the .h5; its `.splits.json` manifest names the train and val splits.
        data_root: the data root(s) the model was trained on.
        target_accuracy: accuracy that predictions not flagged "uncertain" must reach on val.

    Returns:
        The "calibration" and "ood" blocks written, plus figures measured on val.
    """
    from .evaluation import expected_calibration_error
    from .evaluation import splits_path_for
    from .predictor import Predictor

    predictor = Predictor.from_path(model_path)
    predictor.load()
    manifest = json.loads(splits_path_for(model_path).read_text())
    data = load_datasets(data_root, predictor.input_size, cache_dir=cache_dir, progress=progress)
    splits = _split_indices(data, manifest)
    y = data.label_indices
    val, train = splits["val"], splits["train"]

    val_probs, val_emb, val_features = measure_images(predictor, data.images[val], _read(data, val))
    train_probs, train_emb, train_features = measure_images(
        predictor, data.images[train], [None] * len(train))
    exposure, negatives = _fit_exposure(predictor, data, train, train_emb, train_features)
    temperature = calibration.fit_temperature(val_probs, y[val])
    calibrated = calibration.apply_temperature(val_probs, temperature)
    correct = calibrated.argmax(1) == y[val]
    uncertain = calibration.choose_uncertain_threshold(calibrated.max(1), correct, target_accuracy)
    block = {
        "temperature": round(temperature, 6),
        "fitted_on": "val",
        "images": int(len(val)),
        "nll_before": round(calibration.negative_log_likelihood(val_probs, y[val]), 4),
        "nll_after": round(calibration.negative_log_likelihood(calibrated, y[val]), 4),
        "ece_before": round(expected_calibration_error(val_probs.argmax(1) == y[val], val_probs.max(1)), 4),
        "ece_after": round(expected_calibration_error(correct, calibrated.max(1)), 4),
        **uncertain,
    }
    guard = ood.fit_guard(val_features, train_emb, y[train], val_emb, exposure=exposure)
    val_all = dict(val_features, **guard.model_scores(val_emb, val_features))
    refused = np.array([guard.check({k: v[i] for k, v in val_all.items()}).refused for i in range(len(val))])
    ood_block = guard.to_metadata() | {
        "fitted_on": {"centroids": "train", "bounds": "val"},
        "embedding": f"global average of layer {predictor.conv_layer!r}",
        "val_refusal_rate": round(float(refused.mean()), 4),
        "exposure_negatives": negatives,
    }
    meta_path = metadata_path_for(model_path)
    meta = json.loads(meta_path.read_text())
    meta["calibration"] = block
    meta["ood"] = ood_block
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    summary = {k: v for k, v in ood_block.items() if k not in ("centroids", "whitening_float32_base64")}
    return {"calibration": block, "ood": summary, "metadata": str(meta_path)}


def ood_test_images(data: CachedDataset | None, test_indices: np.ndarray | None,
                    mri_count: int = 40) -> list[ood_sets.OODImage]:
    """Every OOD category: synthetic, photos, CT, and variants of `mri_count` test-split MRIs."""
    images = [*ood_sets.synthetic_images(), *ood_sets.photo_images(), *ood_sets.ct_images()]
    if data is not None and test_indices is not None and len(test_indices):
        chosen = test_indices[np.linspace(0, len(test_indices) - 1, min(mri_count, len(test_indices))).astype(int)]
        greys, labels = [], []
        for i in chosen:
            grey = cv2.imdecode(np.frombuffer(data.file(i).read_bytes(), np.uint8),
                                cv2.IMREAD_GRAYSCALE)
            if grey is not None:
                greys.append(grey)
                labels.append(data.labels[i])
        images.extend(ood_sets.mri_variants(greys, labels))
    return images


def _rate(flags) -> float | None:
    flags = list(flags)
    return round(float(np.mean(flags)), 4) if flags else None


def evaluate_trust(predictor, data: CachedDataset, sets: dict[str, np.ndarray],
                   out_dir: Path) -> dict[str, Any]:
    """ECE before/after, the uncertain flag, false refusals and OOD refusals per category."""
    from . import plots
    from .evaluation import expected_calibration_error

    y = data.label_indices
    report: dict[str, Any] = {"temperature": predictor.temperature,
                              "uncertain_below": predictor.uncertain_below,
                              "calibration": {}, "false_refusal": {}, "ood": {}}
    guard = predictor.guard
    # The first collection's held-out test split draws the reliability plots and the MRI variants.
    first_test = next((name for name in sets if name.endswith("/test")), None)
    for name, indices in sets.items():
        if not len(indices):
            continue
        probs, emb, features = measure_images(predictor, data.images[indices], _read(data, indices))
        calibrated = calibration.apply_temperature(probs, predictor.temperature)
        correct = calibrated.argmax(1) == y[indices]
        entry = {
            "images": int(len(indices)),
            "ece_before": round(expected_calibration_error(correct, probs.max(1)), 4),
            "ece_after": round(expected_calibration_error(correct, calibrated.max(1)), 4),
            "nll_before": round(calibration.negative_log_likelihood(probs, y[indices]), 4),
            "nll_after": round(calibration.negative_log_likelihood(calibrated, y[indices]), 4),
        }
        if predictor.uncertain_below is not None:
            flagged = calibrated.max(1) < predictor.uncertain_below
            entry["uncertain_rate"] = _rate(flagged)
            entry["accuracy_confident"] = _rate(correct[~flagged])
            entry["accuracy_uncertain"] = _rate(correct[flagged])
        report["calibration"][name] = entry
        if name == first_test:
            plots.reliability(out_dir / "reliability_test_before_calibration.png",
                              "test, before calibration", y[indices], probs)
            plots.reliability(out_dir / "reliability_test_after_calibration.png",
                              "test, after calibration", y[indices], calibrated)
        if guard is not None:
            features.update(guard.model_scores(emb, features))
            verdicts = [guard.check({k: v[i] for k, v in features.items()}) for i in range(len(indices))]
            report["false_refusal"][name] = {
                "images": int(len(indices)),
                "refused": int(sum(v.refused for v in verdicts)),
                "rate": _rate(v.refused for v in verdicts),
                "reasons": dict(Counter(r for v in verdicts for r in v.reasons)),
            }
    if guard is None:
        report["ood"] = {"note": "no OOD guard in the metadata; run `brainmri calibrate` first"}
        return report
    categories: dict[str, dict[str, Any]] = {}
    for image in ood_test_images(data, sets.get(first_test)):
        entry = categories.setdefault(image.category, {
            "expect": "refuse" if image.expect_refusal else "pass", "images": 0, "refused": 0,
            "unreadable": 0, "reasons": Counter(), "_correct": []})
        entry["images"] += 1
        try:
            model_input = predictor.prepare(image.data)
        except ImageError:
            entry["unreadable"] += 1  # refused before the guard: the upload is not a usable image
            entry["refused"] += 1
            continue
        probs, emb = predictor.forward(model_input[None, ...])
        verdict = guard.assess(model_input, image.data, emb)
        entry["refused"] += int(verdict.refused)
        entry["reasons"].update(verdict.reasons)
        if not verdict.refused and image.label is not None:
            top = predictor.labels[int(np.argmax(probs[0]))]
            entry["_correct"].append(top == image.label)
    refuse_flags, pass_flags, unexposed_flags = [], [], []
    for name, entry in categories.items():
        entry["refusal_rate"] = round(entry["refused"] / entry["images"], 4)
        # The exposure head saw this transform family (on training images): an optimistic figure.
        entry["exposed"] = guard.exposure is not None and name in ood_sets.EXPOSED_CATEGORIES
        entry["reasons"] = dict(entry["reasons"])
        correct = entry.pop("_correct")
        if correct:
            entry["accuracy_of_passed"] = _rate(correct)
        flags = refuse_flags if entry["expect"] == "refuse" else pass_flags
        outcome = [1] * entry["refused"] + [0] * (entry["images"] - entry["refused"])
        flags.extend(outcome)
        if entry["expect"] == "refuse" and not entry["exposed"]:
            unexposed_flags.extend(outcome)
    report["ood"] = {
        "categories": categories,
        "refusal_rate_expected_refuse": _rate(refuse_flags),
        "refusal_rate_expected_refuse_unexposed": _rate(unexposed_flags),
        "images_expected_refuse_unexposed": len(unexposed_flags),
        "refusal_rate_expected_pass": _rate(pass_flags),
        "images_expected_refuse": len(refuse_flags),
    }
    return report
