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
from dataclasses import replace
from typing import Any

import cv2
import numpy as np

from ..inference import calibration
from ..inference import ood
from . import ood_sets
from . import reformats
from .dataset import CachedDataset
from .dataset import load_datasets
from ..imaging import ImageError
from ..imaging import decode_file
from ..inference import CLASSES
from ..inference import UncertaintyRule
from ..inference import fit_feature_space
from ..inference import metadata_path_for

__all__ = ["calibrate", "evaluate_trust", "measure_images", "ood_test_images"]

# Positives the exposure head is fitted on, drawn evenly from the training split: more adds
# nothing measurable to a 220-input linear model and slows the held-out refits.
HEAD_POSITIVES = 4000
# Training slices whose patch and inversion become synthetic negatives.
EXPOSURE_SLICES = 1500
# The guard network, in its own folder beside the models so that model discovery never
# mistakes it for a classifier (`brainmri train-guard`).
GUARD_FILE = "guard/brainmri_guard.h5"
# Checks the guard network replaces when it is there. Measured on the default CNN (docs/research.md,
# Trust): with them beside the network, false refusals were 1.3 % of SARTAJ test, 4.3 % of the
# official Testing folder and 5.2 % of its unseen part (target <= 1 %), against 0 %, 1.0 % and
# 0 % for the network and the cheap checks alone; they added 10 points on held-out head CT
# and 3 on held-out spine/knee MRI.
REPLACED_BY_NETWORK = ("feature_distance", "appearance_distance", "mri_likeness")
# The scores the guard network gives (`guardnet.GuardNet.scores`); their bounds are its own.
NETWORK_FEATURES = ("brain_likeness", "brain_distance")


def _canonical(predictor, probs: np.ndarray) -> np.ndarray:
    return probs[:, [predictor.labels.index(name) for name in CLASSES]]


def measure_images(predictor, images: np.ndarray, colours: list[float | None], batch: int = 128,
                   network=None, peaks: list[float | None] | None = None):
    """Uncalibrated softmax (canonical order), pooled features, cheap features and descriptors.

    `colours` holds each image's file colour, `peaks` its file's peak brightness
    (`imaging.read_scan`; None: not measured: grey, and no "peak_brightness", which is then NaN
    and never refused). With a guard `network`, its "brain_likeness" logit (and
    "brain_distance", when fitted) join the cheap features.
    """
    probs, embeddings = [], []
    for start in range(0, len(images), batch):
        p, e = predictor.forward(images[start : start + batch])
        probs.append(p)
        embeddings.append(e)
    probs_all = _canonical(predictor, np.concatenate(probs)) if probs else np.zeros((0, len(CLASSES)))
    emb_all = np.concatenate(embeddings) if embeddings else np.zeros((0, 0))
    peaks = list(peaks) if peaks is not None else [None] * len(images)
    cheap = [ood.image_features(image, colour, peak)
             for image, colour, peak in zip(images, colours, peaks)]
    names = sorted({name for row in cheap for name in row})
    features = {name: np.array([row.get(name, np.nan) for row in cheap], np.float64)
                for name in names}
    if network is not None and len(images):
        features.update({name: values.astype(np.float64)
                         for name, values in network.scores(images).items()})
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


def _file_signals(data: CachedDataset, indices: np.ndarray) -> tuple[list[float], list[float | None]]:
    """The files' colour and peak brightness, measured as an upload's decode does (the cache
    holds preprocessed inputs only)."""
    decoded = [decode_file(data.file(i).read_bytes()) for i in indices]
    return [d.colourfulness for d in decoded], [d.peak_brightness for d in decoded]


def _measure_set(predictor, data: CachedDataset, indices: np.ndarray, network=None):
    """`measure_images` on cached slices, with their files' colour and peak brightness."""
    colours, peaks = _file_signals(data, indices)
    return measure_images(predictor, data.images[indices], colours, network=network, peaks=peaks)


@dataclass
class _Measured:
    """Images measured once for the guard: their features, and who they are."""

    emb: np.ndarray
    features: dict[str, np.ndarray]
    descriptors: np.ndarray
    categories: np.ndarray
    sources: np.ndarray
    unreadable: dict[str, int]  # category -> files the decoder refused before any guard
    names: np.ndarray | None = None  # "<category>/<file>" of each measured item, when known

    def rows(self, keep: np.ndarray | None = None) -> np.ndarray:
        """Exposure-head input rows (all, or the `keep` mask)."""
        keep = np.ones(len(self.emb), bool) if keep is None else keep
        return ood.Exposure.inputs(self.emb[keep], {k: v[keep] for k, v in self.features.items()},
                                   self.descriptors[keep])

    def subset(self, keep: np.ndarray) -> dict[str, Any]:
        """Features, embeddings and descriptors of the `keep` rows, for a guard check."""
        return {"emb": self.emb[keep], "features": {k: v[keep] for k, v in self.features.items()},
                "descriptors": self.descriptors[keep]}


def _measure_files(predictor, items: list[tuple[str, str, bytes]], network=None,
                   names: list[str] | None = None) -> _Measured:
    """Prepare (the upload path) and measure (category, source, bytes) items."""
    inputs, colours, peaks, categories, sources, kept = [], [], [], [], [], []
    unreadable: Counter = Counter()
    for k, (category, source, data) in enumerate(items):
        try:
            scan = predictor.prepare_scan(data)
        except ImageError:
            unreadable[category] += 1
            continue
        inputs.append(scan.model_input)
        colours.append(scan.colourfulness)
        peaks.append(scan.peak_brightness)
        categories.append(category)
        sources.append(source)
        kept.append(names[k] if names else "")
    size = predictor.input_size
    images = np.stack(inputs) if inputs else np.zeros((0, size, size, 1), np.float32)
    _, emb, features, descriptors = measure_images(predictor, images, colours, network=network,
                                                   peaks=peaks)
    return _Measured(emb, features, descriptors, np.array(categories), np.array(sources),
                     dict(unreadable), np.array(kept) if names else None)


def synthetic_negative_files(data: CachedDataset, train: np.ndarray,
                             slices: int = EXPOSURE_SLICES) -> list[tuple[str, str, bytes]]:
    """(category, source, file bytes) of the synthetic negatives the exposure head and the
    guard network both learn from: a patch and an inversion of `slices` training slices, and
    noise, gradients, text, checkerboards and blanks."""
    chosen = train[np.linspace(0, len(train) - 1, min(slices, len(train))).astype(int)]
    greys, made_from = [], []
    for i in chosen:
        grey = cv2.imdecode(np.frombuffer(data.file(i).read_bytes(), np.uint8), cv2.IMREAD_GRAYSCALE)
        if grey is not None:
            greys.append(grey)
            made_from.append(data.collections[i])
    # The source names the slice's collection: a guard fold that leaves a brain collection out
    # must not learn that collection's look from its patches and inversions as negatives.
    items = [("exposure_" + ("patch" if k % 2 == 0 else "inverted"),
              ood_sets.made_from_slices(made_from[k // 2]), png)
             for k, png in enumerate(ood_sets.exposure_negatives(greys))]
    # Noise, gradients, text, checkerboards and blanks from other seeds than the test set's:
    # with LGG's tightly cropped slices in validation, the cheap bounds no longer refuse
    # smooth noise on their own. Those test categories are then reported as exposed.
    items += [(f"exposure_{image.category}", "synthetic", image.data)
              for image in ood_sets.synthetic_images(per_category=24, seed=20261201)]
    return items


def _synthetic_negatives(predictor, data: CachedDataset, train: np.ndarray,
                         network=None) -> _Measured:
    """The synthetic negatives (`synthetic_negative_files`), through the upload path."""
    return _measure_files(predictor, synthetic_negative_files(data, train), network)


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
    for category in sorted(set(real.categories.tolist()) | set(real.unreadable)):
        out = real.categories == category
        head = _fit_head(positives, [(real.rows(~out), real.categories[~out]), synthetic_part])
        tally = _tally(_verdicts(_with_head(base, head, val), real.subset(out)),
                       real.unreadable.get(category, 0))
        report["categories"][category] = tally
        sources = sorted(set(real.sources[out].tolist()))
        if len(sources) < 2:
            continue
        report["sources"][category] = {}
        for source in sources:
            held = out & (real.sources == source)
            head = _fit_head(positives, [(real.rows(~held), real.categories[~held]), synthetic_part])
            report["sources"][category][source] = _tally(
                _verdicts(_with_head(base, head, val), real.subset(held)))
    _summarise(report)
    report["rule"] = ("each category (source) refused by a guard whose exposure head was fitted "
                      "without it; bounds refitted on validation")
    return report


def _summarise(report: dict[str, Any]) -> None:
    """Overall refusal, image count, worst category and worst source of a held-out report."""
    tallies = report["categories"].values()
    images = sum(t["images"] for t in tallies)
    source_rates = [t["rate"] for by in report["sources"].values() for t in by.values()]
    report["overall"] = round(sum(t["refused"] for t in tallies) / images, 4) if images else None
    report["images"] = images
    report["worst_category"] = min((t["rate"], c) for c, t in report["categories"].items())
    report["worst_source"] = min(source_rates) if source_rates else None


def network_held_out(guard: ood.OODGuard, real: _Measured,
                     source_real: _Measured | None = None) -> dict[str, Any]:
    """Refusal of each real category (and source) when the guard network never saw it.

    `real` carries, per image, the logit of the network trained without its category
    (`_held_out_network`); every other check is fitted on brain slices only, so nothing else
    needs refitting. A source's figure comes from `source_real`, the network trained without
    that source alone, when train-guard ran those folds; else from the same category-out
    network, a stricter test than leaving out the source alone.
    """
    verdicts = _verdicts(guard, real.subset(np.ones(len(real.emb), bool)))
    source_verdicts = (verdicts if source_real is None else
                       _verdicts(guard, source_real.subset(np.ones(len(real.emb), bool))))
    report: dict[str, Any] = {"categories": {}, "sources": {}}
    for category in sorted(set(real.categories.tolist()) | set(real.unreadable)):
        out = real.categories == category
        report["categories"][category] = _tally([v for v, o in zip(verdicts, out) if o],
                                                real.unreadable.get(category, 0))
        sources = sorted(set(real.sources[out].tolist()))
        if len(sources) > 1:
            report["sources"][category] = {
                source: _tally([v for v, o, s in zip(source_verdicts, out, real.sources)
                                if o and s == source]) for source in sources}
    _summarise(report)
    report["rule"] = ("each category refused by the guard whose network was trained without "
                      "that category (its other checks never see a negative); sources judged by "
                      + ("a network trained without that source alone, the category's other "
                         "sources kept" if source_real is not None else
                         "the same category-out network"))
    return report


def _load_network(path: Path):
    """The guard network at `path` and its metadata, refusing another preprocessing version."""
    from ..imaging import PREPROCESSING_VERSION
    from ..inference.guardnet import GuardNet

    meta = json.loads(path.with_suffix(".json").read_text())
    if meta.get("preprocessing_version") != PREPROCESSING_VERSION:
        raise ValueError(f"{path.name} was trained on preprocessing version "
                         f"{meta.get('preprocessing_version')}, this code runs "
                         f"{PREPROCESSING_VERSION}; retrain it with `brainmri train-guard`.")
    return GuardNet.load(path), meta


def _relative(path: Path, folder: Path) -> str:
    """`path` relative to `folder` (the model's), as the metadata names it."""
    try:
        return Path(path).resolve().relative_to(Path(folder).resolve()).as_posix()
    except ValueError:
        return str(Path(path).resolve())


def _held_out_network(real: _Measured, meta: dict[str, Any], margin_key: str = "margins",
                      distance_key: str = "distance_margins") -> tuple[_Measured, int]:
    """`real` with each image's "brain_likeness" and "brain_distance" from the network that
    never saw its category.

    `brainmri train-guard --held-out` stored, per real image, how far it lay inside each bound
    of the fold that left its category out (logit minus bound, bound minus distance); the
    shipped bound plus (minus) that margin gives that fold's decision against the shipped bound.
    An image without a stored logit margin keeps the shipped network's (optimistic) value;
    their count is returned. One without a distance margin (its fold predates the distance:
    held_out["distance_folds_not_run"]) is not judged by the distance at all, which can only
    understate its category's refusal. `margin_key`/`distance_key` "source_margins"/
    "source_distance_margins" give the folds that left out the image's source alone.
    """
    held = meta.get("held_out") or {}
    features = dict(real.features)
    names = real.names if real.names is not None else []
    margins = held.get(margin_key) or {}
    values = np.array(features["brain_likeness"], np.float64)
    missing = 0
    for i, image in enumerate(names):
        if image in margins:
            values[i] = meta["bound"] + margins[image]
        else:
            missing += 1
    features["brain_likeness"] = values
    bound = (meta.get("embedding") or {}).get("bound")
    if "brain_distance" in features and bound is not None:
        distances = held.get(distance_key) or {}
        features["brain_distance"] = np.array(
            [bound - distances[image] if image in distances else -np.inf for image in names],
            np.float64)
    return replace(real, features=features), missing


# Share of validation slices whose features count as typical of their predicted class.
TYPICAL_QUANTILE = 0.95
UNCERTAINTY_RULE = (
    "confident only when the calibrated top-class probability reaches `confidence_below` and "
    "the slice's pooled features lie within `distance_above` (the 95th percentile on "
    "validation) of the training slices of that class (shared-covariance Mahalanobis)")


def fit_uncertainty(train_features: np.ndarray, train_labels: np.ndarray,
                    val_calibrated: np.ndarray, val_features: np.ndarray, val_labels: np.ndarray,
                    target_accuracy: float, classes: int,
                    quantile: float = TYPICAL_QUANTILE) -> tuple[UncertaintyRule, dict[str, Any]]:
    """The "uncertain" rule, fitted on validation: a feature-distance bound, then the lowest
    probability threshold at which the typical slices reach `target_accuracy`.

    Returns the rule and the figures `choose_uncertain_threshold` measured, with coverage and
    accuracy recomputed for the whole rule on the validation split.
    """
    centre, projection, means = fit_feature_space(train_features, train_labels, classes)
    probe = UncertaintyRule(0.0, np.inf, centre, projection, means)
    distance = probe.distances(val_features)[np.arange(len(val_labels)), val_calibrated.argmax(1)]
    # A class the model never trained on has no mean (NaN): as far as can be.
    bound = float(np.quantile(np.nan_to_num(distance, nan=np.inf), quantile, method="higher"))
    typical = distance <= bound
    correct = val_calibrated.argmax(1) == val_labels
    chosen = calibration.choose_uncertain_threshold(val_calibrated.max(1)[typical],
                                                    correct[typical], target_accuracy)
    rule = UncertaintyRule(chosen["uncertain_below"], bound, centre, projection, means)
    confident = ~rule.flags(val_calibrated, val_features)
    figures = chosen | {
        "coverage": round(float(confident.mean()), 4),
        "accuracy_confident": round(float(correct[confident].mean()), 4) if confident.any() else None,
        "accuracy_uncertain": round(float(correct[~confident].mean()), 4)
        if (~confident).any() else None,
        "atypical_rate": round(float((~typical).mean()), 4),
    }
    return rule, figures


def calibrate(model_path: Path, data_root: Path | list[Path], cache_dir: Path | None = None,
              target_accuracy: float = 0.98, progress=None,
              ood_root: Path | None = None, guard_network: Path | None = None) -> dict[str, Any]:
    """Fit temperature, uncertain threshold and OOD guard; write them into the model metadata.

    Args:
        model_path: the .h5; its `.splits.json` manifest names the train and val splits.
        data_root: the data root(s) the model was trained on.
        target_accuracy: accuracy that predictions not flagged "uncertain" must reach on val.
        ood_root: real images that are not brain MRI (`ood_sets.real_negatives` layout);
            default `ood_sets.default_ood_root()`.
        guard_network: the guard network (`brainmri train-guard`); default `GUARD_FILE` beside
            the model, used when it exists. Its bound joins the model's guard.

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
    # A sequence the model was kept from (leave-one-sequence-out) stays out of its fit too.
    excluded = set((predictor.card.raw.get("training") or {}).get("excluded_sequences") or [])
    if excluded:
        val = np.array([i for i in val if data.sequences[i] not in excluded], int)
        train = np.array([i for i in train if data.sequences[i] not in excluded], int)

    guard_path = Path(guard_network) if guard_network else model_path.parent / GUARD_FILE
    network, network_meta = _load_network(guard_path) if guard_path.is_file() else (None, None)
    val_probs, val_emb, val_features, val_desc = _measure_set(predictor, data, val, network)
    # The centroids use every training slice; the head an even draw of them.
    _, train_emb, train_features, train_desc = measure_images(
        predictor, data.images[train], [None] * len(train))
    temperature = calibration.fit_temperature(val_probs, y[val])
    calibrated = calibration.apply_temperature(val_probs, temperature)
    correct = calibrated.argmax(1) == y[val]
    rule, uncertain = fit_uncertainty(train_emb, y[train], calibrated, val_emb, y[val],
                                      target_accuracy, len(predictor.labels))
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
    # The network's bound is its own (set on validation by train-guard), not refitted here.
    base = ood.fit_guard({k: v for k, v in val_features.items() if k not in NETWORK_FEATURES},
                         train_emb, y[train], val_emb, val_descriptors=val_desc,
                         train_descriptors=train_desc)
    for name in REPLACED_BY_NETWORK if network is not None else ():
        base.bounds.pop(name, None)
    if network is not None:
        base.bounds["brain_likeness"] = (float(network_meta["bound"]), None)
        distance = network_meta.get("embedding")
        if distance is not None:
            base.bounds["brain_distance"] = (None, float(distance["bound"]))
        base.info["network"] = {"file": _relative(guard_path, model_path.parent),
                                "sha256": network_meta["sha256"],
                                "onnx_sha256": network_meta.get("onnx_sha256"),
                                "bound": network_meta["bound"],
                                **({"distance_bound": distance["bound"]} if distance else {})}
    pick = np.linspace(0, len(train) - 1, min(HEAD_POSITIVES, len(train))).astype(int)
    positives = ood.Exposure.inputs(train_emb[pick], {k: v[pick] for k, v in train_features.items()},
                                    train_desc[pick])
    synthetic = _synthetic_negatives(predictor, data, train, network)
    real_root = Path(ood_root) if ood_root else ood_sets.default_ood_root()
    found = ood_sets.real_negatives(real_root)
    real_items = [(n.category, n.source, n.path.read_bytes()) for n in found]
    real = _measure_files(predictor, real_items, network,
                          names=[f"{n.category}/{n.path.name}" for n in found])
    val_measured = {"emb": val_emb, "features": val_features, "descriptors": val_desc}
    if network is None:
        head = _fit_head(positives, [(real.rows(), real.categories),
                                     (synthetic.rows(), synthetic.categories)])
        guard = _with_head(base, head, val_measured)
        held_out = held_out_refusals(base, positives, real, synthetic, val_measured)
    else:
        # No exposure head and no appearance distance: the network replaces both.
        guard = ood.OODGuard(base.bounds, base.centroids, base.whitening, base.info)
        held_real, without_margin = _held_out_network(real, network_meta)
        source_real = (_held_out_network(real, network_meta, "source_margins",
                                         "source_distance_margins")[0]
                       if (network_meta.get("held_out") or {}).get("source_margins") else None)
        held_out = network_held_out(guard, held_real, source_real)
    refused = np.array([v.refused for v in _verdicts(guard, val_measured)])
    if network is not None:
        held = network_meta.get("held_out") or {}
        margins = held.get("margins") or {}
        in_sample = sorted({str(c) for c, name in zip(real.categories, real.names)
                            if name not in margins})
        held_out["network"] = {"file": _relative(guard_path, model_path.parent),
                               "held_out_images": int(len(real.emb) - without_margin),
                               "without_held_out_margin": int(without_margin),
                               # The network saw these categories: their figures are optimistic.
                               "in_sample_categories": in_sample,
                               # Judged without the distance (no fold measured it): pessimistic.
                               "distance_not_held_out": held.get("distance_folds_not_run", [])}
    negatives = {
        "positives": f"{len(pick)} training-split slices, evenly drawn from every collection",
        "real": f"{len(real_items)} images of {len(set(real.categories.tolist()))} categories "
                f"from {real_root.name}/ (equal weight per category)",
        "synthetic": dict(Counter(synthetic.categories.tolist())),
    }
    ood_block = guard.to_metadata() | {
        "fitted_on": {"centroids": "train", "bounds": "val",
                      **({"network": "train + ood_train + synthetic (brainmri train-guard)"}
                         if network is not None else
                         {"exposure": "train + ood_train + altered train"})},
        "embedding": f"global average of layer {predictor.conv_layer!r}",
        "val_refusal_rate": round(float(refused.mean()), 4),
        "exposure_negatives": negatives,
        "held_out": held_out,
    }
    meta_path = metadata_path_for(model_path)
    meta = json.loads(meta_path.read_text())
    meta["calibration"] = block
    meta["uncertainty"] = rule.to_metadata() | {"rule": UNCERTAINTY_RULE,
                                                "fitted_on": "train (class means), val (bounds)"}
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


# Slices filed among a collection's MRI that are not MRI (audits/*.tsv: path, sha256).
NOT_MRI_AUDITS = Path(__file__).parent / "audits"


def listed_not_mri(folder: Path = NOT_MRI_AUDITS) -> set[str]:
    """Paths ("<collection>/<path>") of slices an audit found not to be MRI (head CT in SARTAJ)."""
    listed = set()
    for audit in sorted(Path(folder).glob("*.tsv")):
        for line in audit.read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.startswith("#"):
                listed.add(line.split("\t")[0])
    return listed


def _rate(flags) -> float | None:
    flags = list(flags)
    return round(float(np.mean(flags)), 4) if flags else None


NO_TUMOR = CLASSES.index("no_tumor")


def _served_confidence(correct: np.ndarray, uncertain: np.ndarray, refused: np.ndarray,
                       said_tumour: np.ndarray, is_tumour: np.ndarray,
                       sequences: list[str]) -> dict[str, Any]:
    """How the answers shown as confident fare, as the page and API give them.

    Coverage is the share of slices answered confidently (neither refused by the guard nor
    flagged uncertain); precision is how often those answers name the right class; tumour
    sensitivity is among tumour slices answered confidently. Overall and per sequence.
    """
    def figures(keep: np.ndarray) -> dict[str, Any]:
        confident = keep & ~uncertain & ~refused
        tumour = confident & is_tumour
        return {"images": int(keep.sum()),
                "coverage": _rate(confident[keep]),
                "precision": _rate(correct[confident]),
                "confident_tumour_sensitivity": _rate(said_tumour[tumour]),
                "refused": _rate(refused[keep])}

    seqs = np.array(sequences)
    return figures(np.ones(len(correct), bool)) | {
        "by_sequence": {name: figures(seqs == name)
                        for name in sorted(set(sequences) - {"unspecified"})}}


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
    network = guard.network if guard is not None else None
    not_mri = listed_not_mri()
    # The first collection's held-out test split draws the reliability plots and the MRI variants.
    first_test = next((name for name in sets if name.endswith("/test")), None)
    for name, indices in sets.items():
        if not len(indices):
            continue
        probs, emb, features, descriptors = _measure_set(predictor, data, indices, network)
        calibrated = calibration.apply_temperature(probs, predictor.temperature)
        correct = calibrated.argmax(1) == y[indices]
        entry = {
            "images": int(len(indices)),
            "ece_before": round(expected_calibration_error(correct, probs.max(1)), 4),
            "ece_after": round(expected_calibration_error(correct, calibrated.max(1)), 4),
            "nll_before": round(calibration.negative_log_likelihood(probs, y[indices]), 4),
            "nll_after": round(calibration.negative_log_likelihood(calibrated, y[indices]), 4),
        }
        measured = {"emb": emb, "features": features, "descriptors": descriptors}
        # The guard's verdicts, once per set: the served figures and the false refusals use them.
        verdicts = _verdicts(guard, measured) if guard is not None else None
        if predictor.uncertain_below is not None:
            flagged = (calibrated.max(1) < predictor.uncertain_below) | predictor.atypical(
                calibrated, emb)
            entry["uncertain_rate"] = _rate(flagged)
            entry["accuracy_confident"] = _rate(correct[~flagged])
            entry["accuracy_uncertain"] = _rate(correct[flagged])
            refused = (np.array([v.refused for v in verdicts], bool) if verdicts is not None
                       else np.zeros(len(indices), bool))
            entry["served"] = _served_confidence(
                correct, flagged, refused, calibrated.argmax(1) != NO_TUMOR,
                y[indices] != NO_TUMOR, [data.sequences[i] for i in indices])
        report["calibration"][name] = entry
        if name == first_test:
            plots.reliability(out_dir / "reliability_test_before_calibration.png",
                              "test, before calibration", y[indices], probs)
            plots.reliability(out_dir / "reliability_test_after_calibration.png",
                              "test, after calibration", y[indices], calibrated)
        if verdicts is not None:
            listed = np.array([data.paths[i] in not_mri for i in indices], bool)
            # Almost-black files (the guard's fixed "peak_brightness" rule) show no anatomy:
            # refusing them is right, so they are also tallied apart, beside the whole.
            black = np.array(["peak_brightness" in v.reasons for v in verdicts], bool)
            seqs = [data.sequences[i] for i in indices]

            def by_sequence(keep: np.ndarray) -> dict[str, Any]:
                return {sequence: _tally([v for v, s, k in zip(verdicts, seqs, keep)
                                          if s == sequence and k])
                        for sequence in sorted(set(seqs) - {"unspecified"})}

            report["false_refusal"][name] = _tally(verdicts) | {
                # Refusing a slice that is not MRI is right: the MRI-only figure leaves them out.
                **({"mri_only": _tally([v for v, x in zip(verdicts, listed) if not x]),
                    "listed_not_mri": _tally([v for v, x in zip(verdicts, listed) if x])}
                   if listed.any() else {}),
                **({"not_almost_black": _tally([v for v, b in zip(verdicts, black) if not b]),
                    "almost_black": _tally([v for v, b in zip(verdicts, black) if b]),
                    "by_sequence_not_almost_black": by_sequence(~black)}
                   if black.any() else {}),
                "by_sequence": by_sequence(np.ones(len(indices), bool))}
    if guard is not None:
        from .dataset import no_head_in_view

        blank = np.flatnonzero(no_head_in_view(data.images))
        if len(blank):
            # Should be refused: a blank frame has no head to classify.
            _, emb, features, descriptors = _measure_set(predictor, data, blank, network)
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
            measured = _measure_files(predictor, items, network)
            verdicts = _verdicts(guard, measured.subset(np.ones(len(measured.emb), bool)))
            black = np.array(["peak_brightness" in v.reasons for v in verdicts], bool)
            report["false_refusal"][f"{name} (DICOM)"] = _tally(
                verdicts, sum(measured.unreadable.values())) | (
                {"not_almost_black": _tally([v for v, b in zip(verdicts, black) if not b]),
                 "almost_black": _tally([v for v, b in zip(verdicts, black) if b])}
                if black.any() else {})
        # Sagittal and coronal reformats of the held-out patients' axial stacks: brain MRI in
        # planes an axial-only collection (LGG) lacks, of patients the guard never saw.
        for name in [n for n in sets if n.endswith("/test")]:
            made = reformats.reformats([data.file(i) for i in sets[name]])
            if not made:
                continue
            measured = _measure_files(
                predictor, [(r.plane, r.sequence, r.png()) for r in made], network)
            verdicts = _verdicts(guard, measured.subset(np.ones(len(measured.emb), bool)))
            planes, seqs = measured.categories, measured.sources
            report["false_refusal"][f"{name} (sagittal and coronal reformats)"] = _tally(
                verdicts, sum(measured.unreadable.values())) | {
                "volumes": len({(r.case, r.sequence) for r in made}),
                "by_plane": {plane: _tally([v for v, x in zip(verdicts, planes) if x == plane])
                             for plane in sorted(set(planes))},
                "by_sequence": {seq: _tally([v for v, x in zip(verdicts, seqs) if x == seq])
                                for seq in sorted(set(seqs))}}
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
        verdict = guard.assess(model_input, scan.colourfulness, emb, scan.peak_brightness)
        entry["refused"] += int(verdict.refused)
        entry["reasons"].update(verdict.reasons)
        if not verdict.refused and image.label is not None:
            top = predictor.labels[int(np.argmax(probs[0]))]
            entry["_correct"].append(top == image.label)
    refuse_flags, pass_flags, unexposed_flags = [], [], []
    for name, entry in categories.items():
        entry["refusal_rate"] = round(entry["refused"] / entry["images"], 4)
        # The exposure head saw this transform family (on training images): an optimistic figure.
        entry["exposed"] = ((guard.exposure is not None or guard.network is not None)
                            and name in ood_sets.EXPOSED_CATEGORIES)
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
