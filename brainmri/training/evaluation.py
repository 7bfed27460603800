"""Measure a trained model: metrics, calibration and plots for each evaluation set, per collection.

Evaluation sets are named `<collection>/<set>` and come from the split manifest written by
`brainmri train`: each collection's held-out `test` split (whole patients where the collection
names them, else whole near-duplicate groups), its `val` split, an official Testing folder, and
the part of that folder with no near-duplicate in anything the model trained or validated on
(`official_test_novel`). A collection the model never trained on gets `<collection>/unseen`
(all of it) and `<collection>/test` (the same patients a model trained on it would be tested
on), so leave-one-collection-out figures sit beside the in-collection ones. Every set is also
broken down by MRI sequence, with any-tumour sensitivity and specificity.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import dedup
from .dataset import UNSPECIFIED
from .dataset import CachedDataset
from .dataset import load_datasets
from .dataset import no_head_in_view
from ..inference import CLASSES
from .metrics import binary_metrics
from .metrics import classification_metrics
from .splits import manifest_splits
from .splits import split_dataset
from .splits import splits_path_for
from .splits import trained_collections

__all__ = [
    "EvalSet",
    "by_sequence",
    "pointing_score",
    "eval_sets",
    "evaluate",
    "predict_canonical",
]


@dataclass(frozen=True)
class EvalSet:
    """A named subset of the data set to evaluate on."""

    name: str
    indices: np.ndarray
    description: str


def by_sequence(y_true: np.ndarray, probs: np.ndarray, sequences: list[str]) -> dict[str, Any]:
    """Accuracy and any-tumour sensitivity/specificity per MRI sequence (empty when unnamed)."""
    sequences = np.asarray(sequences)
    names = sorted(set(sequences.tolist()) - {UNSPECIFIED})
    table = {}
    for name in names:
        keep = sequences == name
        correct = np.asarray(probs)[keep].argmax(1) == np.asarray(y_true)[keep]
        table[name] = {"images": int(keep.sum()), "accuracy": round(float(correct.mean()), 4),
                       **binary_metrics(np.asarray(y_true)[keep], np.asarray(probs)[keep])}
    return table


def _has_patients(data: CachedDataset, idx: np.ndarray) -> bool:
    return len(idx) > 0 and all(data.patients[i] for i in idx)


def eval_sets(data: CachedDataset, manifest: dict | None) -> list[EvalSet]:
    """The evaluation sets of every collection in `data`, given the model's split manifest."""
    index = {path: i for i, path in enumerate(data.paths)}
    collections = np.array(data.collections)
    trained = trained_collections(manifest) if manifest else []
    splits = ({name: np.array([index[p] for p in paths if p in index], dtype=int)
               for name, paths in manifest_splits(manifest).items()} if manifest else {})
    distance = (manifest or {}).get("group_distance", dedup.DEFAULT_MAX_DISTANCE)
    seed = (manifest or {}).get("seed", 42)
    blank = no_head_in_view(data.images)
    # Blank slices are scored by no set (the guard's refusal of them is reported instead),
    # whichever split an older manifest put them in.
    splits = {name: idx[~blank[idx]] for name, idx in splits.items()}
    sets: list[EvalSet] = []
    for collection in data.roots:
        everyone = np.flatnonzero(collections == collection)
        members = everyone[~blank[everyone]]
        held = "held-out patients" if _has_patients(data, members) else "leakage-free test split"
        if collection in trained:
            part = {name: idx[collections[idx] == collection] for name, idx in splits.items()}
        else:
            # Never trained on: the split a model trained on this collection would have, so the
            # leave-one-collection-out figure uses the same patients as the in-collection one.
            plan = split_dataset(data.subset(everyone), seed=seed, group_distance=distance)
            part = {name: everyone[plan.indices(name)] for name in ("test", "official_test")}
            unseen = members[np.array(data.sources)[members] != "test"]
            sets.append(EvalSet(f"{collection}/unseen", unseen,
                                f"all of {collection}, a collection the model never trained on"))
            held += f" ({collection} was never trained on)"
        empty = np.array([], int)
        if len(part.get("test", empty)):
            sets.append(EvalSet(f"{collection}/test", part["test"],
                                f"{held}: nothing shared with train or val"))
        if len(part.get("val", empty)):
            sets.append(EvalSet(f"{collection}/val", part["val"],
                                "validation split (used for early stopping)"))
        official = part.get("official_test", empty)
        if len(official):
            seen = np.concatenate([part.get("train", empty), part.get("val", empty)]).astype(int)
            groups = dedup.group_near_duplicates(data.hashes[members], distance)
            group_of = dict(zip(members.tolist(), groups.tolist()))
            seen_groups = {group_of[i] for i in seen.tolist()}
            novel = np.array([i for i in official if group_of[int(i)] not in seen_groups], dtype=int)
            sets.append(EvalSet(f"{collection}/official_test", official,
                                "the collection's own Testing folder"))
            sets.append(EvalSet(f"{collection}/official_test_novel", novel,
                                "Testing-folder images with no near-duplicate in train or val"))
    return sets


def pointing_score(predictor, data: CachedDataset, indices: np.ndarray, dilation: float = 0.03,
                   batch: int = 64) -> dict[str, Any] | None:
    """Share of tumour slices whose Grad-CAM peak (for the true class) lies in the dilated mask.

    Masks are read from `<collection root>/masks/<slice>.png` (the `lgg/` layout) and cut and
    resized exactly as `preprocess` cuts the image. Returns None when no slice has a mask.
    """
    import cv2

    from ..imaging import decode_image
    from ..imaging import resize_mask

    size = predictor.input_size
    radius = max(1, int(round(dilation * size)))
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    chosen, masks = [], []
    for i in indices:
        path = data.file(int(i))
        stem = path.stem
        if data.sequences[i] != UNSPECIFIED:
            stem = stem[: -len(data.sequences[i]) - 1]
        mask_path = data.roots[data.collections[i]] / "masks" / f"{stem}.png"
        if data.labels[i] == "no_tumor" or not mask_path.is_file():
            continue
        mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
        image = decode_image(path.read_bytes())
        if mask is None or mask.shape != image.shape:
            continue
        masks.append(cv2.dilate(resize_mask(mask > 0, image, size).astype(np.uint8), disk) > 0)
        chosen.append(int(i))
    if not chosen:
        return None
    hits = []
    for start in range(0, len(chosen), batch):
        idx = chosen[start : start + batch]
        classes = np.array([predictor.labels.index(data.labels[i]) for i in idx], np.int32)
        cams = predictor.gradcam_batch(data.images[idx], classes)
        for cam, mask in zip(cams, masks[start : start + batch]):
            y, x = np.unravel_index(int(np.argmax(cam)), cam.shape)
            hits.append(bool(mask[y, x]))
    hits = np.array(hits)
    sequences = np.array([data.sequences[i] for i in chosen])
    return {
        "slices": int(len(hits)),
        "pointing": round(float(hits.mean()), 4),
        "by_sequence": {name: round(float(hits[sequences == name].mean()), 4)
                        for name in sorted(set(sequences.tolist()))},
        "rule": f"Grad-CAM peak for the true class inside the tumour mask dilated by {radius} px "
                f"({dilation:.0%} of the {size}-px input)",
    }


def predict_canonical(predictor, images: np.ndarray, batch: int = 128) -> np.ndarray:
    """Uncalibrated softmax in batches, columns in the canonical class order."""
    outputs = [predictor.predict_arrays(images[i : i + batch]) for i in range(0, len(images), batch)]
    raw = np.concatenate(outputs) if outputs else np.zeros((0, len(predictor.labels)))
    # Reorder the model's outputs into the canonical class order.
    return raw[:, [predictor.labels.index(name) for name in CLASSES]]


def evaluate(model_path: Path, data_roots: Path | list[Path], out_dir: Path,
             cache_dir: Path | None = None, progress=None) -> dict[str, Any]:
    """Evaluate `model_path` on every collection given, write metrics.json and plots into `out_dir`."""
    from . import plots
    from ..inference import Predictor

    predictor = Predictor.from_path(model_path)
    predictor.load()
    data = load_datasets(data_roots, predictor.input_size, cache_dir=cache_dir, progress=progress)
    manifest_path = splits_path_for(model_path)
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    y = data.label_indices
    report: dict[str, Any] = {
        "model": predictor.card.summary,
        "data": data.name,
        "trained_on": trained_collections(manifest) if manifest else None,
        "split_manifest": manifest_path.name if manifest else None,
        "sets": {},
        "pointing": {},
    }
    curves = {}
    sets = eval_sets(data, manifest)
    for eval_set in sets:
        if len(eval_set.indices) == 0:
            continue
        # The served (temperature-calibrated) probabilities; `trust` compares with the raw ones.
        probs = predictor.calibrate(predict_canonical(predictor, data.images[eval_set.indices]))
        truth = y[eval_set.indices]
        metrics = classification_metrics(truth, probs)
        metrics["tumor_vs_no_tumor"] = binary_metrics(truth, probs)
        metrics["by_sequence"] = by_sequence(truth, probs,
                                             [data.sequences[i] for i in eval_set.indices])
        metrics["description"] = eval_set.description
        report["sets"][eval_set.name] = metrics
        curves[eval_set.name.replace("/", "_")] = (truth, probs)
        if eval_set.name.endswith("/test") or eval_set.name.endswith("/unseen"):
            pointing = pointing_score(predictor, data, eval_set.indices)
            if pointing is not None:
                report["pointing"][eval_set.name] = pointing
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
