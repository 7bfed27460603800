"""Three more ways to refuse kinds the guard never saw, on its own folds (measured: none helps).

    uv run python experiments/guard_alternatives.py                     # ../shared/data, all three
    uv run python experiments/guard_alternatives.py --only joint --data-root DIR

The shipped guard (`brainmri/training/guard_trunk.py`) refuses an upload when its logit falls
below the 0.5 % validation tail, or its distance to the nearest brain prototype rises above it
(each bound widened by 0.25 of its distance to the median). Judged by leave-one-category-out on
`ood_train/`, it refuses 91.7 % of the held-out real images (network alone; target 97 %), and
every earlier change that refused more also refused more brain slices (docs/research.md). This
measures three changes of a different kind, on the same folds as `train-guard --held-out` (the
shipped recipe's positives and negatives, the trunk's features computed once):

- ``baseline``: the shipped rule, to check these folds reproduce `train-guard`'s.
- ``joint``: one bound on the sum of the two scores, each as a robust z-score of the validation
  slices (median and the 10-50 or 50-90 percentile spread), with the distance weighted by
  `--joint-weights`, at the 0.5, 0.75 and 1 % validation tails: does a rule that sees both
  scores at once refuse what is borderline on both (a CT slice) for fewer brain slices?
- ``shuffled``: 1,500 training slices cut into 2 x 2 or 4 x 4 tiles, shuffled (and half of the
  tiles turned) as one more negative kind: MRI texture without a head's layout, which is what
  abdominal and cardiac MRI look like to the trunk.
- ``patches``: a one-class score on the trunk's *spatial* map (block 10, 4 x 4 positions of
  112 channels on the 64-px input, standardised by the positives): the distance of each
  position's features to the nearest of `--patch-prototypes` k-means centres of the positives at
  that position, the largest over positions (PatchCore-like, with the layout kept). It never
  sees a negative, so every real category is held out by construction.

Each prints the share of every real category refused by a guard fitted without it, the brain
slices of the held-out sets refused by the guard fitted on everything (SARTAJ test, the official
Testing folder, LGG's test patients, the sagittal and coronal reformats of LGG's test patients;
audited CT and almost-black files apart), and, for a brain collection left out, the share of its
validation slices refused. About 12 minutes on the two cores (assembling the data and the
trunk's features are 7 of them; each fold is fitted once and shared by every rule).

What it showed on 2026-12-05 (network alone). The baseline reproduced `train-guard`'s folds to
the image: 926/1010 = 91.7 % of held-out categories, official Testing 3/358, LGG test 7/1628,
SARTAJ test 0/390, reformats 0/480; SARTAJ out 7.2 %, LGG out 11.1 %.

- joint: no weight or tail refuses more held-out images than the shipped union for as few
  brain slices: every setting above 91.7 % refuses 6/358 official Testing. Weight 1 at
  the 0.75 % tail refuses 91.2 % for 4/358 official Testing, 4/1628 LGG test and 1/390 SARTAJ
  test (LGG out 15.5 %); at 1 %, 93.1 % for 6/358; weight 2 at 0.5 %, 87.2 % for 0/358 and
  3/1628 (SARTAJ out 2.1 %, LGG out 13.5 %); weight 2 at 1 %, 92.9 % for 6/358.
- shuffled: 926/1010 again (abdominal/cardiac MRI 65 -> 66 %, head CT 65 -> 61 %), the same
  number of brain slices refused; LGG out 11.1 -> 9.5 %, SARTAJ out 7.2 -> 8.5 %.
- patches: 51.5 % of the real images refused (head CT 5 %, abdominal/cardiac MRI 35 %), with
  5/390 SARTAJ test, 4/358 official Testing and 14/1628 LGG test refused. ImageNet features of
  one 16-px region do not tell a CT or an abdomen from a brain where the whole view does.
  (Scratch runs of the same score on block 4's 8 x 8 positions, and against 1,024 centres of
  every position's features pooled, refused 17 % and 56 %.)
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TAIL = 0.005  # each bound's validation tail, as GuardConfig.tail
WIDEN = 0.25  # each bound's widening, as train-guard's folds chose it
SPATIAL_BLOCK = 10  # the trunk's last tapped block: 4 x 4 positions on the 64-px input


def shuffle_tiles(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A (S, S) image cut into 2 x 2 or 4 x 4 tiles, put back in a shuffled order (never the
    same one), half of them turned by a multiple of 90 degrees."""
    grid = int(rng.choice([2, 4]))
    side = image.shape[0] // grid
    tiles = [image[r * side:(r + 1) * side, c * side:(c + 1) * side]
             for r in range(grid) for c in range(grid)]
    order = rng.permutation(len(tiles))
    while np.array_equal(order, np.arange(len(tiles))):
        order = rng.permutation(len(tiles))
    moved = [np.rot90(tiles[k], int(rng.integers(4))) if rng.random() < 0.5 else tiles[k]
             for k in order]
    return np.vstack([np.hstack(moved[r * grid:(r + 1) * grid]) for r in range(grid)])


def _log(distances: np.ndarray) -> np.ndarray:
    # A slice can sit on a prototype (distance 0, clipped so by `PrototypeFit`).
    return np.log(np.maximum(distances, 1e-12))


class JointRule:
    """One bound on logit and distance together: (median - logit) / its lower spread plus
    `weight` x (log distance - median) / its upper spread, spreads and bound from validation."""

    def __init__(self, val_logits: np.ndarray, val_distances: np.ndarray, weight: float,
                 tail: float):
        self.weight = weight
        log_d = _log(val_distances)
        self.logit_median = float(np.median(val_logits))
        self.logit_spread = float(self.logit_median - np.percentile(val_logits, 10))
        self.distance_median = float(np.median(log_d))
        self.distance_spread = float(np.percentile(log_d, 90) - self.distance_median)
        scores = self.score(val_logits, val_distances)
        quantile = float(np.quantile(scores, 1.0 - tail))
        self.bound = quantile + WIDEN * (quantile - float(np.median(scores)))

    def score(self, logits: np.ndarray, distances: np.ndarray) -> np.ndarray:
        """Larger is less like a brain slice."""
        return ((self.logit_median - logits) / self.logit_spread
                + self.weight * (_log(distances) - self.distance_median) / self.distance_spread)

    def refused(self, logits: np.ndarray, distances: np.ndarray) -> np.ndarray:
        """True where the joint score passes the bound."""
        return self.score(logits, distances) > self.bound


class PositionalPrototypes:
    """k-means centres of the positives' features at each position of a spatial map; an image
    scores the largest, over positions, of its squared distance (per channel) to the nearest
    centre of that position."""

    def __init__(self, maps: np.ndarray, count: int, seed: int = 0):
        from sklearn.cluster import MiniBatchKMeans

        flat = maps.reshape(-1, maps.shape[-1])
        self.mean, self.scale = flat.mean(axis=0), flat.std(axis=0) + 1e-3
        z = self._standardise(maps)
        self.centres = np.stack([
            np.stack([MiniBatchKMeans(count, random_state=seed, batch_size=4096, n_init=1)
                      .fit(z[:, i, j]).cluster_centers_ for j in range(z.shape[2])])
            for i in range(z.shape[1])])

    def _standardise(self, maps: np.ndarray) -> np.ndarray:
        return (np.asarray(maps, np.float64) - self.mean) / self.scale

    def score(self, maps: np.ndarray) -> np.ndarray:
        """Each image's largest per-position distance to that position's nearest centre."""
        z = self._standardise(maps)
        height, width, _, dims = self.centres.shape
        worst = np.zeros(len(z))
        for i in range(height):
            for j in range(width):
                f, c = z[:, i, j], self.centres[i, j]
                d = (f ** 2).sum(1)[:, None] - 2 * f @ c.T + (c ** 2).sum(1)[None]
                worst = np.maximum(worst, d.min(axis=1) / dims)
        return worst


class Folds:
    """The guard's data and trunk features, and its folds (`guard_imagenet_trunk.Fold`, fitted
    as `train-guard` fits them), fitted once and shared by every rule judged on them."""

    def __init__(self, data_root: Path, splits_path: Path):
        from experiments import guard_imagenet_trunk as trunk_benchmark
        from brainmri.training import guard_training

        splits = json.loads(splits_path.read_text())
        self.data = guard_training.assemble([data_root / "sartaj", data_root / "lgg"], splits,
                                            data_root / "ood_train",
                                            config=guard_training.GuardConfig())
        self.inputs = trunk_benchmark.held_out_brain_inputs(data_root, splits)
        self.inputs["lgg/test reformats"] = trunk_benchmark.reformat_inputs(
            data_root / "lgg", splits, "test")
        features = guard_training.trunk_features_of(self.data)
        self.pos, self.neg, self.val = (features[k] for k in ("positives", "negatives", "val"))
        self.brain = {name: trunk_benchmark.trunk_features(x) for name, x in self.inputs.items()}
        self._fitted = None

    def add_negatives(self, features: np.ndarray, category: str, sources: np.ndarray) -> None:
        """More synthetic negatives (no name: they are never judged as held-out images); the
        folds are fitted again when next asked for."""
        d = self.data
        self.neg = np.concatenate([self.neg, features])
        d.categories = np.r_[d.categories, np.full(len(features), category)]
        d.sources = np.r_[d.sources, sources]
        d.names = np.r_[d.names, np.full(len(features), "")]
        self._fitted = None

    def _fit(self, keep_pos: np.ndarray, keep_neg: np.ndarray, keep_val: np.ndarray):
        from experiments import guard_imagenet_trunk as trunk_benchmark

        d = self.data
        return trunk_benchmark.Fold(self.pos[keep_pos], d.collections[keep_pos],
                                    self.neg[keep_neg], d.categories[keep_neg],
                                    self.val[keep_val], c=0.03, shrinkage=0.3, prototypes=1024)

    def fitted(self):
        """(category folds, the fold on everything, collection folds): each category fold is
        (category, its real images' features, fold fitted without it); each collection fold is
        (collection, its native validation slices' features, fold fitted without it)."""
        if self._fitted is None:
            from brainmri.training import ood_sets

            d = self.data
            all_pos, all_val = np.ones(len(self.pos), bool), np.ones(len(self.val), bool)
            categories = [(c, self.neg[d.categories == c],
                           self._fit(all_pos, d.categories != c, all_val))
                          for c in sorted(set(d.categories[d.real].tolist()))]
            everything = self._fit(all_pos, np.ones(len(self.neg), bool), all_val)
            collections = [(c, self.val[(d.val_collections == c) & d.val_native],
                            self._fit(d.collections != c,
                                      d.sources != ood_sets.made_from_slices(c),
                                      d.val_collections != c))
                           for c in sorted(set(d.collections.tolist()))]
            self._fitted = categories, everything, collections
        return self._fitted


def union_rule(fold):
    """The shipped rule: refused below the logit's bound or above the distance's."""
    return lambda rows: np.logical_or(*fold.refused(rows, WIDEN))


def joint_rule(weight: float, tail: float):
    """`JointRule` with its spreads and bound from each fold's validation scores."""
    def make(fold):
        rule = JointRule(fold.val_logit, fold.val_distance, weight, tail)
        return lambda rows: rule.refused(*fold.scores(rows))
    return make


def report(folds: Folds, make_rule, label: str) -> None:
    """Print the category-out, brain-set and collection-out figures of one rule;
    make_rule(fold) -> refused(features) -> bool per row."""
    categories, everything, collections = folds.fitted()
    total = refused = 0
    shares = []
    for category, rows, fold in categories:
        out = make_rule(fold)(rows)
        total, refused = total + len(out), refused + int(out.sum())
        shares.append(f"{category} {out.mean():.2f}")
    rule = make_rule(everything)
    brain = [f"{name} {int(rule(x).sum())}/{len(x)}" for name, x in folds.brain.items()]
    left_out = [f"{collection} out {make_rule(fold)(rows).mean():.3f}"
                for collection, rows, fold in collections]
    print(f"{label}: held-out categories {refused}/{total} = {refused / total:.3f}\n"
          f"    {' | '.join(shares)}\n    brain slices refused: {' ; '.join(brain)}\n"
          f"    a brain collection left out, its validation slices refused: "
          f"{' ; '.join(left_out)}", flush=True)


@functools.cache
def _spatial_model(side: int):
    """The shipped trunk up to block 10, built once: every set below runs through it."""
    import keras
    import tensorflow as tf

    from brainmri.training import lite0

    base = lite0.build_classifier(size=side, weights="imagenet-lite0")
    model = keras.Model(base.input, base.get_layer(f"block{SPATIAL_BLOCK}_add").output)
    return tf.function(lambda x: model(x, training=False), autograph=False)


def spatial_maps(images: np.ndarray) -> np.ndarray:
    """The shipped trunk's block-10 output (N, 4, 4, 112) of uint8 64-px guard inputs."""
    import tensorflow as tf

    run = _spatial_model(images.shape[1])
    return np.concatenate([np.asarray(run(tf.constant(images[i:i + 256], tf.float32) / 255.0))
                           for i in range(0, len(images), 256)])


def patches(folds: Folds, count: int) -> None:
    """The positional one-class score, bounded at the 0.5 % validation tail (no widening)."""
    d = folds.data
    maps = {"positives": spatial_maps(d.positives), "val": spatial_maps(d.val),
            "negatives": spatial_maps(d.negatives)}
    fit = PositionalPrototypes(maps["positives"], count)
    bound = float(np.quantile(fit.score(maps["val"]), 1.0 - TAIL))
    scores = fit.score(maps["negatives"])
    shares = [f"{c} {np.mean(scores[d.categories == c] > bound):.2f}"
              for c in sorted(set(d.categories[d.real].tolist()))]
    brain = [f"{name} {int((fit.score(spatial_maps(x)) > bound).sum())}/{len(x)}"
             for name, x in folds.inputs.items()]
    left_out = []
    for collection in sorted(set(d.collections.tolist())):
        kept = PositionalPrototypes(maps["positives"][d.collections != collection], count)
        kept_bound = np.quantile(kept.score(maps["val"][d.val_collections != collection]), 1 - TAIL)
        theirs = maps["val"][(d.val_collections == collection) & d.val_native]
        left_out.append(f"{collection} out {np.mean(kept.score(theirs) > kept_bound):.3f}")
    print(f"patches ({count} centres per position): every real category unseen, refused "
          f"{np.mean(scores[d.real] > bound):.3f}\n    {' | '.join(shares)}\n"
          f"    brain slices refused: {' ; '.join(brain)}\n"
          f"    a brain collection left out: {' ; '.join(left_out)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--splits", type=Path, default=ROOT / "model" / "brainmri_cnn.splits.json")
    parser.add_argument("--only", choices=("baseline", "joint", "shuffled", "patches"),
                        nargs="+", default=["baseline", "joint", "shuffled", "patches"])
    parser.add_argument("--joint-weights", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    parser.add_argument("--shuffled", type=int, default=1500, help="tile-shuffled negatives")
    parser.add_argument("--patch-prototypes", type=int, default=64)
    args = parser.parse_args()

    start = time.perf_counter()
    folds = Folds(args.data_root, args.splits)
    print(f"{len(folds.pos)} brain slices, {len(folds.neg)} negatives, {len(folds.val)} "
          f"validation slices; features in {time.perf_counter() - start:.0f} s", flush=True)
    if "baseline" in args.only:
        report(folds, union_rule, "baseline (the shipped rule)")
    if "joint" in args.only:
        for weight in args.joint_weights:
            for tail in (0.005, 0.0075, 0.01):
                report(folds, joint_rule(weight, tail),
                       f"joint, distance weight {weight}, tail {tail}")
    if "patches" in args.only:
        patches(folds, args.patch_prototypes)
    if "shuffled" in args.only:  # last: it adds negatives to every later fold
        from experiments import guard_imagenet_trunk as trunk_benchmark
        from brainmri.training import ood_sets

        d = folds.data
        # `assemble` puts the training split's own slices first, then the zoomed-in copies and
        # reformats (fewer than half of the positives), so the first half are all originals.
        picked = np.linspace(0, len(d.positives) // 2 - 1, args.shuffled).astype(int)
        rng = np.random.default_rng(7)
        made = np.stack([shuffle_tiles(d.positives[i, :, :, 0], rng) for i in picked])[..., None]
        folds.add_negatives(trunk_benchmark.trunk_features(made), "exposure_shuffled",
                            np.array([ood_sets.made_from_slices(c) for c in d.collections[picked]]))
        report(folds, union_rule, f"shuffled ({args.shuffled} tile-shuffled training slices)")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
