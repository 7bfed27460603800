"""Fit and measure the trust layer: temperature scaling, the "uncertain" threshold, the OOD guard.

`calibrate` fits everything on the validation split (the guard's class centroids and its
exposure head on the training split and the real non-brain images of `ood_train/`) and stores it
in the model metadata. It also measures the guard as it will meet the world: refitted once per
held-out category of `ood_train/` (and once per held-out source within a category), so every
refusal rate it reports is of images whose kind the guard never saw. `evaluate_trust` measures
false refusals on every evaluation set (and DICOM copies of test slices) and the refusals of the
OOD test images of `ood_sets`, and carries the held-out figures.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from ..inference import calibration
from ..inference import ood
from . import ood_sets
from .dataset import CachedDataset
from .dataset import load_datasets
from ..imaging import ImageError
from ..imaging import decode_file
from ..inference import CLASSES
from ..inference import metadata_path_for

__all__ = ["calibrate", "evaluate_trust", "measure_images", "ood_test_images"]

# Positives the exposure head is fitted on, drawn evenly from the training split: more adds
# nothing measurable to a 220-input linear model and slows the held-out refits.
HEAD_POSITIVES = 4000
# Training slices whose patch and inversion become synthetic negatives.
EXPOSURE_SLICES = 1500


def _canonical(predictor, probs: np.ndarray) -> np.ndarray:
    return probs[:, [predictor.labels.index(name) for name in CLASSES]]


def measure_images(predictor, images: np.ndarray, colours: list[float | None], batch: int = 128):
    """Uncalibrated softmax (canonical order), pooled features, cheap features and descriptors.

    `colours` holds each image's file colour (`imaging.read_scan`; None: not measured, grey).
    """
    probs, embeddings = [], []
    for start in range(0, len(images), batch):
        p, e = predictor.forward(images[start : start + batch])
        probs.append(p)
        embeddings.append(e)
    probs_all = _canonical(predictor, np.concatenate(probs)) if probs else np.zeros((0, len(CLASSES)))
    emb_all = np.concatenate(embeddings) if embeddings else np.zeros((0, 0))
    cheap = [ood.image_features(image, colour) for image, colour in zip(images, colours)]
    features = {name: np.array([row[name] for row in cheap]) for name in (cheap[0] if cheap else {})}
    descriptors = np.array([ood.descriptor(image) for image in images])
    return probs_all, emb_all, features, descriptors


def _split_indices(data: CachedDataset, manifest: dict) -> dict[str, np.ndarray]:
    from .splits import manifest_splits

    from .dataset import no_head_in_view

    index = {path: i for i, path in enumerate(data.paths)}
    blank = no_head_in_view(data.images)
    # Blank slices neither fit the guard (they would stretch every bound) nor count as refusals.
    return {name: np.array([index[p] for p in paths if p in index and not blank[index[p]]],
                           dtype=int)
            for name, paths in manifest_splits(manifest).items()}


def _colours(data: CachedDataset, indices: np.ndarray) -> list[float]:
    """The files' colour, measured as an upload's decode does (the cache holds grey inputs)."""
    return [decode_file(data.file(i).read_bytes()).colourfulness for i in indices]


@dataclass
class _Measured:
    """Images measured once for the guard: their features, and who they are."""

    emb: np.ndarray
    features: dict[str, np.ndarray]
    descriptors: np.ndarray
    categories: np.ndarray
    sources: np.ndarray
    unreadable: dict[str, int]  # category -> files the decoder refused before any guard

    def rows(self, keep: np.ndarray | None = None) -> np.ndarray:
        """Exposure-head input rows (all, or the `keep` mask)."""
        keep = np.ones(len(self.emb), bool) if keep is None else keep
        return ood.Exposure.inputs(self.emb[keep], {k: v[keep] for k, v in self.features.items()},
                                   self.descriptors[keep])

    def subset(self, keep: np.ndarray) -> dict[str, Any]:
        """Features, embeddings and descriptors of the `keep` rows, for a guard check."""
        return {"emb": self.emb[keep], "features": {k: v[keep] for k, v in self.features.items()},
                "descriptors": self.descriptors[keep]}


def _measure_files(predictor, items: list[tuple[str, str, bytes]]) -> _Measured:
    """Prepare (the upload path) and measure (category, source, bytes) items."""
    inputs, colours, categories, sources = [], [], [], []
    unreadable: Counter = Counter()
    for category, source, data in items:
        try:
            scan = predictor.prepare_scan(data)
        except ImageError:
            unreadable[category] += 1
            continue
        inputs.append(scan.model_input)
        colours.append(scan.colourfulness)
        categories.append(category)
        sources.append(source)
    size = predictor.input_size
    images = np.stack(inputs) if inputs else np.zeros((0, size, size, 1), np.float32)
    _, emb, features, descriptors = measure_images(predictor, images, colours)
    return _Measured(emb, features, descriptors, np.array(categories), np.array(sources),
                     dict(unreadable))


def _synthetic_negatives(predictor, data: CachedDataset, train: np.ndarray) -> _Measured:
    """A patch and an inversion of `EXPOSURE_SLICES` training slices, through the upload path."""
    chosen = train[np.linspace(0, len(train) - 1, min(EXPOSURE_SLICES, len(train))).astype(int)]
    greys = []
    for i in chosen:
        grey = cv2.imdecode(np.frombuffer(data.file(i).read_bytes(), np.uint8), cv2.IMREAD_GRAYSCALE)
        if grey is not None:
            greys.append(grey)
    items = [("exposure_" + ("patch" if k % 2 == 0 else "inverted"), "training split", png)
             for k, png in enumerate(ood_sets.exposure_negatives(greys))]
    # Noise, gradients, text, checkerboards and blanks from other seeds than the test set's:
    # with LGG's tightly cropped slices in validation, the cheap bounds no longer refuse
    # smooth noise on their own. Those test categories are then reported as exposed.
    items += [(f"exposure_{image.category}", "synthetic", image.data)
              for image in ood_sets.synthetic_images(per_category=24, seed=20261201)]
    return _measure_files(predictor, items)


def _fit_head(positives: np.ndarray, negatives: list[tuple[np.ndarray, np.ndarray]]) -> ood.Exposure:
    """Fit the exposure head; each negative group (rows, category labels) weighs equally per category."""
    rows = np.concatenate([r for r, _ in negatives])
    labels = np.concatenate([c for _, c in negatives])
    counts = Counter(labels.tolist())
    weights = np.array([1.0 / counts[c] for c in labels])
    return ood.fit_exposure(positives, rows, negative_weights=weights, uses_descriptor=True)


def _with_head(base: ood.OODGuard, head: ood.Exposure, val: dict[str, Any]) -> ood.OODGuard:
    """`base` with another exposure head, its low bound refitted on the validation split."""
    likeness = head.score(val["emb"], val["features"], val["descriptors"])
    bounds = dict(base.bounds)
    bounds["mri_likeness"] = ood._bound(likeness, "low", base.info.get("distance_tail", 0.005),
                                        base.info.get("margin", 0.5))
    return ood.OODGuard(bounds, base.centroids, base.whitening, base.info, head, base.appearance)


def _verdicts(guard: ood.OODGuard, measured: dict[str, Any]) -> list[ood.Verdict]:
    features = dict(measured["features"])
    features.update(guard.model_scores(measured["emb"], features, measured["descriptors"]))
    count = len(measured["emb"])
    return [guard.check({k: v[i] for k, v in features.items()}) for i in range(count)]


def _tally(verdicts: list[ood.Verdict], unreadable: int = 0) -> dict[str, Any]:
    refused = sum(v.refused for v in verdicts) + unreadable
    images = len(verdicts) + unreadable
    return {"images": images, "refused": int(refused),
            "rate": round(refused / images, 4) if images else None,
            "reasons": dict(Counter(r for v in verdicts for r in v.reasons)),
            **({"unreadable": unreadable} if unreadable else {})}


def held_out_refusals(base: ood.OODGuard, positives: np.ndarray, real: _Measured,
                      synthetic: _Measured, val: dict[str, Any]) -> dict[str, Any]:
    """Refusal of each `ood_train` category (and source) by a guard refitted without it.

    Leave-one-category-out: the exposure head is refitted on every other category (plus the
    synthetic negatives) and its bound on validation, then asked about the held-out category.
    Leave-one-source-out does the same for each source of a category with several sources,
    keeping the rest of its category. The cheap bounds and the feature distance never see a
    negative, so they need no refit.
    """
    synthetic_part = (synthetic.rows(), synthetic.categories)
    report: dict[str, Any] = {"categories": {}, "sources": {}}
    refused_all, images_all = 0, 0
    for category in sorted(set(real.categories.tolist()) | set(real.unreadable)):
        out = real.categories == category
        head = _fit_head(positives, [(real.rows(~out), real.categories[~out]), synthetic_part])
        tally = _tally(_verdicts(_with_head(base, head, val), real.subset(out)),
                       real.unreadable.get(category, 0))
        report["categories"][category] = tally
        refused_all += tally["refused"]
        images_all += tally["images"]
        sources = sorted(set(real.sources[out].tolist()))
        if len(sources) < 2:
            continue
        report["sources"][category] = {}
        for source in sources:
            held = out & (real.sources == source)
            head = _fit_head(positives, [(real.rows(~held), real.categories[~held]), synthetic_part])
            report["sources"][category][source] = _tally(
                _verdicts(_with_head(base, head, val), real.subset(held)))
    source_rates = [t["rate"] for by in report["sources"].values() for t in by.values()]
    report["overall"] = round(refused_all / images_all, 4) if images_all else None
    report["images"] = images_all
    report["worst_category"] = min((t["rate"], c) for c, t in report["categories"].items())
    report["worst_source"] = min(source_rates) if source_rates else None
    report["rule"] = ("each category (source) refused by a guard whose exposure head was fitted "
                      "without it; bounds refitted on validation")
    return report


def calibrate(model_path: Path, data_root: Path | list[Path], cache_dir: Path | None = None,
              target_accuracy: float = 0.98, progress=None,
              ood_root: Path | None = None) -> dict[str, Any]:
    """Fit temperature, uncertain threshold and OOD guard; write them into the model metadata.

    Args:
        model_path: the .h5; its `.splits.json` manifest names the train and val splits.
        data_root: the data root(s) the model was trained on.
        target_accuracy: accuracy that predictions not flagged "uncertain" must reach on val.
        ood_root: real images that are not brain MRI (`ood_sets.real_negatives` layout);
            default `ood_sets.default_ood_root()`.

    Returns:
        The "calibration" and "ood" blocks written, plus figures measured on val.
    """
    from .metrics import expected_calibration_error
    from .splits import splits_path_for
    from ..inference import Predictor

    predictor = Predictor.from_path(model_path)
    predictor.load()
    manifest = json.loads(splits_path_for(model_path).read_text())
    data = load_datasets(data_root, predictor.input_size, cache_dir=cache_dir, progress=progress)
    splits = _split_indices(data, manifest)
    y = data.label_indices
    val, train = splits["val"], splits["train"]

    val_probs, val_emb, val_features, val_desc = measure_images(
        predictor, data.images[val], _colours(data, val))
    # The centroids use every training slice; the head an even draw of them.
    _, train_emb, train_features, train_desc = measure_images(
        predictor, data.images[train], [None] * len(train))
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
    base = ood.fit_guard(val_features, train_emb, y[train], val_emb, val_descriptors=val_desc,
                         train_descriptors=train_desc)
    pick = np.linspace(0, len(train) - 1, min(HEAD_POSITIVES, len(train))).astype(int)
    positives = ood.Exposure.inputs(train_emb[pick], {k: v[pick] for k, v in train_features.items()},
                                    train_desc[pick])
    synthetic = _synthetic_negatives(predictor, data, train)
    real_root = Path(ood_root) if ood_root else ood_sets.default_ood_root()
    real_items = [(n.category, n.source, n.path.read_bytes())
                  for n in ood_sets.real_negatives(real_root)]
    real = _measure_files(predictor, real_items)
    head = _fit_head(positives, [(real.rows(), real.categories),
                                 (synthetic.rows(), synthetic.categories)])
    val_measured = {"emb": val_emb, "features": val_features, "descriptors": val_desc}
    guard = _with_head(base, head, val_measured)
    refused = np.array([v.refused for v in _verdicts(guard, val_measured)])
    held_out = held_out_refusals(base, positives, real, synthetic, val_measured)
    negatives = {
        "positives": f"{len(pick)} training-split slices, evenly drawn from every collection",
        "real": f"{len(real_items)} images of {len(set(real.categories.tolist()))} categories "
                f"from {real_root.name}/ (equal weight per category)",
        "synthetic": dict(Counter(synthetic.categories.tolist())),
    }
    ood_block = guard.to_metadata() | {
        "fitted_on": {"centroids": "train", "exposure": "train + ood_train + altered train",
                      "bounds": "val"},
        "embedding": f"global average of layer {predictor.conv_layer!r}",
        "val_refusal_rate": round(float(refused.mean()), 4),
        "exposure_negatives": negatives,
        "held_out": held_out,
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
    from .metrics import expected_calibration_error

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
        probs, emb, features, descriptors = measure_images(predictor, data.images[indices],
                                                           _colours(data, indices))
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
            measured = {"emb": emb, "features": features, "descriptors": descriptors}
            verdicts = _verdicts(guard, measured)
            report["false_refusal"][name] = _tally(verdicts) | {
                "by_sequence": {
                    sequence: _tally([v for v, s in zip(verdicts, seqs) if s == sequence])
                    for seqs in [[data.sequences[i] for i in indices]]
                    for sequence in sorted(set(seqs) - {"unspecified"})}}
    if guard is not None:
        from .dataset import no_head_in_view

        blank = np.flatnonzero(no_head_in_view(data.images))
        if len(blank):
            # Should be refused: a blank frame has no head to classify.
            _, emb, features, descriptors = measure_images(predictor, data.images[blank],
                                                           _colours(data, blank))
            report["no_head_in_view"] = _tally(_verdicts(
                guard, {"emb": emb, "features": features, "descriptors": descriptors}))
        # DICOM copies of every held-out test slice: the same pixels through the DICOM decoder.
        for name in [n for n in sets if n.endswith("/test")]:
            items = []
            for i in sets[name]:
                grey = cv2.imdecode(np.frombuffer(data.file(i).read_bytes(), np.uint8),
                                    cv2.IMREAD_GRAYSCALE)
                if grey is not None:
                    items.append((name, "dicom", ood_sets.as_mr_dicom(grey)))
            measured = _measure_files(predictor, items)
            report["false_refusal"][f"{name} (DICOM)"] = _tally(
                _verdicts(guard, measured.subset(np.ones(len(measured.emb), bool))),
                sum(measured.unreadable.values()))
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
            scan = predictor.prepare_scan(image.data)
        except ImageError:
            entry["unreadable"] += 1  # refused before the guard: the upload is not a usable image
            entry["refused"] += 1
            continue
        model_input = scan.model_input
        probs, emb = predictor.forward(model_input[None, ...])
        # The served check, as an upload.
        verdict = guard.assess(model_input, scan.colourfulness, emb)
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
    held_out = (predictor.card.raw.get("ood") or {}).get("held_out")
    report["ood"] = {
        "real_held_out": held_out or {"note": "run `brainmri calibrate` to measure the guard on "
                                              "held-out real categories"},
        "categories": categories,
        "refusal_rate_expected_refuse": _rate(refuse_flags),
        "refusal_rate_expected_refuse_unexposed": _rate(unexposed_flags),
        "images_expected_refuse_unexposed": len(unexposed_flags),
        "refusal_rate_expected_pass": _rate(pass_flags),
        "images_expected_refuse": len(refuse_flags),
    }
    return report
