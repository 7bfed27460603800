"""Split a data set into train / validation / test by duplicate group, stratified by class.

Every member of a near-duplicate group lands in the same split, so the test split is
group-disjoint from everything the model trained or validated on. Images from an official
Testing folder are never trained on; they form their own evaluation set.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import dedup

__all__ = [
    "OFFICIAL_TEST",
    "SPLITS",
    "SplitPlan",
    "manifest_splits",
    "split_by_group",
    "split_dataset",
    "splits_path_for",
    "trained_collections",
]

TRAIN, VAL, TEST = "train", "val", "test"
OFFICIAL_TEST = "official_test"
EXCLUDED = "excluded"
SPLITS = (TRAIN, VAL, TEST)


@dataclass(frozen=True)
class SplitPlan:
    """Per-image split names, index-aligned with the data set."""

    assignment: np.ndarray  # dtype str: train / val / test / official_test / excluded

    def indices(self, split: str) -> np.ndarray:
        """Indices of the images assigned to `split`."""
        return np.flatnonzero(self.assignment == split)

    def counts(self, labels: list[str]) -> dict[str, dict[str, int]]:
        """{split: {class: count}} for a summary or the model metadata."""
        table: dict[str, dict[str, int]] = {}
        for split, label in zip(self.assignment.tolist(), labels):
            table.setdefault(split, Counter())[label] += 1
        return {split: dict(sorted(counter.items())) for split, counter in sorted(table.items())}


def split_by_group(
    groups: np.ndarray,
    labels: list[str],
    sources: list[str],
    fractions: tuple[float, float, float] = (0.70, 0.15, 0.15),
    seed: int = 42,
    exclude_official_test_duplicates: bool = False,
) -> SplitPlan:
    """Assign whole duplicate groups to train/val/test, stratified by each group's majority class.

    Args:
        groups: near-duplicate group id per image (`dedup.group_near_duplicates`).
        labels: class name per image.
        sources: "train" or "test" per image; "test" images (an official Testing folder) are
            set aside as `official_test` and never enter train, val or test. Training images
            whose group has a member in that folder always train: the leakage-free test split
            then shares no image, or copy of one, with the official folder, and the official
            figure follows the published protocol (train on the whole Training folder). The
            evaluation reports the Testing images without such a copy separately.
        fractions: target image fractions for train, val and test.
        seed: makes the split reproducible.
        exclude_official_test_duplicates: also keep out of train/val every image that has a
            near-duplicate in the official Testing folder (makes that folder leak-free too).
    """
    groups = np.asarray(groups)
    n = len(groups)
    if not (len(labels) == len(sources) == n):
        raise ValueError("groups, labels and sources must have the same length")
    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions}")
    assignment = np.full(n, TRAIN, dtype=object)
    is_official = np.array([s == "test" for s in sources])
    assignment[is_official] = OFFICIAL_TEST
    tainted = ~is_official & np.isin(groups, np.unique(groups[is_official]))
    if exclude_official_test_duplicates:
        assignment[tainted] = EXCLUDED

    pool = np.flatnonzero((assignment == TRAIN) & ~tainted)
    members: dict[int, list[int]] = {}
    for index in pool:
        members.setdefault(int(groups[index]), []).append(int(index))
    by_class: dict[str, list[int]] = {}
    for group, idx in members.items():
        majority = Counter(labels[i] for i in idx).most_common(1)[0][0]
        by_class.setdefault(majority, []).append(group)

    rng = np.random.default_rng(seed)
    for label in sorted(by_class):
        class_groups = sorted(by_class[label])
        rng.shuffle(class_groups)
        total = sum(len(members[g]) for g in class_groups)
        targets = {TEST: fractions[2] * total, VAL: fractions[1] * total}
        filled = {TEST: 0, VAL: 0}
        for group in class_groups:
            size = len(members[group])
            # Fill test first, then validation, each up to its target; the rest trains.
            for split in (TEST, VAL):
                if filled[split] + size / 2 <= targets[split]:
                    filled[split] += size
                    assignment[members[group]] = split
                    break
    return SplitPlan(assignment.astype(str))


def split_dataset(
    data,
    fractions: tuple[float, float, float] = (0.70, 0.15, 0.15),
    seed: int = 42,
    group_distance: int = dedup.DEFAULT_MAX_DISTANCE,
    exclude_official_test_duplicates: bool = False,
) -> SplitPlan:
    """Split each collection of a `CachedDataset` on its own, by patient or by duplicate group.

    Every slice and sequence of one patient lands on one side (neighbouring slices and the
    sequences of a slice are near-copies); in a collection without patient ids, near-duplicate
    groups (pHash) play that role. Each collection's split depends only on its own images and
    the seed, so a model trained on fewer collections has the same split of those it saw.
    Blank slices (`dataset.no_head_in_view`) are then set aside as `excluded`.
    """
    from .dataset import no_head_in_view

    assignment = np.empty(len(data.paths), dtype=object)
    collections = np.array(data.collections)
    for collection in data.roots:
        idx = np.flatnonzero(collections == collection)
        if len(idx) == 0:
            continue
        patients = [data.patients[i] for i in idx]
        if all(patients):
            _, groups = np.unique(patients, return_inverse=True)
        else:
            groups = dedup.group_near_duplicates(data.hashes[idx], group_distance)
        plan = split_by_group(
            groups, [data.labels[i] for i in idx], [data.sources[i] for i in idx],
            fractions=fractions, seed=seed,
            exclude_official_test_duplicates=exclude_official_test_duplicates,
        )
        assignment[idx] = plan.assignment
    assignment[no_head_in_view(data.images)] = EXCLUDED
    return SplitPlan(assignment.astype(str))


# The split manifest that `brainmri train` writes beside a model and that evaluation,
# calibration and comparison read back.


def splits_path_for(model_path: Path) -> Path:
    """The split manifest written beside a model (`<stem>.splits.json`)."""
    return Path(model_path).with_suffix(".splits.json")


def trained_collections(manifest: dict) -> list[str]:
    """The collections a split manifest covers (a one-root manifest of version 1 names its root)."""
    return list(manifest.get("collections") or [manifest["root"]])


def manifest_splits(manifest: dict) -> dict[str, list[str]]:
    """{split: ["<collection>/<path>", ...]}; version-1 manifests held paths under their root."""
    prefix = "" if "collections" in manifest else f"{manifest['root']}/"
    return {name: [prefix + path for path in paths] for name, paths in manifest["splits"].items()}
