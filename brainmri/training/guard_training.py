"""Train the guard network (`guardnet.py`) and measure it on kinds of image it never saw.

Positives are the training split of every brain collection (the models' own split manifest, so
no validation or test slice is ever trained on); negatives are the real images of `ood_train/`
and synthetic ones (`ood_sets`: patches and inversions of training slices, head-CT look-alikes,
noise, gradients, text, checkerboards, blanks). Its refusal bound is set on the validation
slices of every collection, and so is the bound of its one-class "brain_distance" (a Gaussian
on the training slices' pooled features, `fit_distance`). `--held-out` retrains once per real
category left out (and once per brain collection left out) and records, for every held-out
image, how far it lay inside both bounds of the network that never saw its kind: that is the
figure the guard is judged by.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..imaging import ImageError
from ..imaging import PREPROCESSING_VERSION
from ..imaging import load_scan
from ..inference import guardnet
from ..inference import ood
from . import ood_sets
from .dataset import load_datasets

__all__ = ["GuardConfig", "GuardData", "assemble", "drop_listed", "fit", "fit_distance", "margins",
           "record_fold", "sample_epoch", "train_guardnet"]


@dataclass(frozen=True)
class GuardConfig:
    """How the guard network is trained and bounded (the defaults are the shipped recipe)."""

    epochs: int = 12
    epoch_images: int = 3072
    batch_size: int = 64
    width: int = 16
    learning_rate: float = 2e-3
    # Share of each epoch drawn from brain slices; the rest are negatives, equal per category.
    positive_share: float = 0.5
    # The refusal bound: the `tail` quantile of validation logits, widened by `margin` times its
    # distance to the median (`ood._bound`). Half the 1 % false-refusal budget, unwidened: the
    # validation logits have a long low tail (LGG end slices of amplified noise, a few CT
    # slices in SARTAJ), so any widening put the bound below most negatives.
    tail: float = 0.005
    margin: float = 0.0
    # "brain_distance" (guardnet.py): its bound is the `distance_tail` quantile of validation
    # distances, widened by the smallest margin whose cross-fitted refusal of validation slices
    # stays under `max_distance_refusal` (`ood.choose_margin`), as for the classifier's features.
    distance_tail: float = 0.005
    max_distance_refusal: float = 0.005
    # 0.3, not the 1 % of the classifier's distances: with SARTAJ left out of training, 1 %
    # refused 14.9 % of its validation slices and 0.3 refused 10.0 % (logit alone 9.2 %) for
    # nearly the same held-out head CT (57.5 vs 55.7 %); a new collection matters more.
    distance_shrinkage: float = 0.3
    ct_like: int = 1500  # head-CT look-alikes made from training slices
    exposure_slices: int = 1500  # training slices whose patch and inversion are negatives
    seed: int = 0


def sample_epoch(rng: np.random.Generator, positive_groups: np.ndarray, negative_groups: np.ndarray,
                 count: int, positive_share: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices into the positives and negatives for one epoch, each side equal per group.

    Positives are grouped by collection (a collection with ten times the slices must not
    teach "brain" as "looks like that collection"), negatives by category.
    """
    def draw(groups: np.ndarray, n: int) -> np.ndarray:
        names = sorted(set(groups.tolist()))
        members = [np.flatnonzero(groups == g) for g in names]
        which = rng.integers(0, len(names), n)
        return np.array([members[g][rng.integers(0, len(members[g]))] for g in which], int)

    n_pos = int(round(count * positive_share))
    return draw(positive_groups, n_pos), draw(negative_groups, count - n_pos)


def _dataset(images: np.ndarray, targets: np.ndarray, batch_size: int, seed: int):
    import tensorflow as tf

    from .trainer import augment_batch

    ds = tf.data.Dataset.from_tensor_slices((images, targets.astype(np.float32)[:, None]))
    ds = ds.shuffle(len(images), seed=seed).batch(batch_size)
    # The classifier's augmentation (geometry, bias field, gamma, resolution, noise, JPEG) on
    # both sides: a brain slice from a new scanner must still read as brain, and a negative
    # must not be recognised by one collection's look.
    ds = ds.map(lambda x, y: (augment_batch(tf.cast(x, tf.float32) / 255.0), y),
                num_parallel_calls=2)
    return ds.prefetch(2)


def train_guardnet(positives: np.ndarray, positive_groups: np.ndarray, negatives: np.ndarray,
                   negative_groups: np.ndarray, config: GuardConfig = GuardConfig(),
                   progress: Callable[[str], None] | None = None):
    """Train the guard network on uint8 (N, side, side, 1) inputs (`guardnet.shrink`).

    Each epoch is a fresh balanced draw (`sample_epoch`), augmented on the fly; the loss is
    binary cross-entropy on the logit (brain slice = 1). Returns the Keras model.
    """
    import keras

    keras.utils.set_random_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = guardnet.build_guardnet(positives.shape[1], width=config.width)
    steps = config.epochs * int(np.ceil(config.epoch_images / config.batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(config.learning_rate, steps)
    model.compile(optimizer=keras.optimizers.Adam(schedule),
                  loss=keras.losses.BinaryCrossentropy(from_logits=True),
                  metrics=[keras.metrics.BinaryAccuracy(threshold=0.0)])
    for epoch in range(config.epochs):
        start = time.perf_counter()
        pos, neg = sample_epoch(rng, positive_groups, negative_groups, config.epoch_images,
                                config.positive_share)
        images = np.concatenate([positives[pos], negatives[neg]])
        targets = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
        history = model.fit(_dataset(images, targets, config.batch_size, config.seed + epoch),
                            epochs=1, verbose=0, shuffle=False)  # tf.data shuffles
        if progress:
            logs = {k: round(float(v[-1]), 4) for k, v in history.history.items()}
            progress(f"guard epoch {epoch + 1}/{config.epochs}: {logs} "
                     f"({time.perf_counter() - start:.0f} s)")
    return model


@dataclass
class GuardData:
    """Everything the guard network is trained and bounded on, at the guard's side."""

    positives: np.ndarray  # uint8 (N, side, side, 1): training-split slices
    collections: np.ndarray  # collection of each positive
    val: np.ndarray  # uint8 validation slices of every collection
    val_collections: np.ndarray
    negatives: np.ndarray  # uint8: real, then synthetic
    categories: np.ndarray  # category of each negative ("exposure_*" for synthetic ones)
    sources: np.ndarray  # source repository; "synthetic", or "training split: <collection>"
    names: np.ndarray  # "<category>/<file>" of real negatives, "" for synthetic ones

    @property
    def real(self) -> np.ndarray:
        """Mask of the real (not synthetic) negatives."""
        return self.names != ""


def _to_u8(images: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(images, np.float32) * 255.0), 0, 255).astype(np.uint8)


def drop_listed(indices: np.ndarray, paths: list[str], listed: set[str]) -> np.ndarray:
    """`indices` less those whose path is in `listed` (`trust.listed_not_mri`), in order."""
    return np.array([i for i in indices if paths[i] not in listed], int)


def assemble(data_roots: list[Path], manifest: dict, ood_root: Path, size: int = 128,
             config: GuardConfig = GuardConfig(), cache_dir: Path | None = None,
             progress=None) -> GuardData:
    """Load positives (train/val of `manifest`, less slices an audit found not to be MRI),
    real negatives and synthetic negatives."""
    from .trust import _split_indices
    from .trust import listed_not_mri
    from .trust import synthetic_negative_files

    data = load_datasets(data_roots, size, cache_dir=cache_dir, progress=progress)
    splits = _split_indices(data, manifest)
    collections = np.array(data.collections)
    # Head CT filed among SARTAJ's MRI (audits/*.tsv) is no brain MRI slice: the guard must not
    # learn it as one, nor make patches and inversions of it.
    train = drop_listed(splits["train"], data.paths, listed_not_mri())
    val = splits["val"]
    inputs, categories, sources, names = [], [], [], []
    for negative in ood_sets.real_negatives(ood_root):
        try:
            inputs.append(load_scan(negative.path.read_bytes(), size))
        except ImageError:
            continue  # refused by the decoder before any guard
        categories.append(negative.category)
        sources.append(negative.source)
        names.append(f"{negative.category}/{negative.path.name}")
    for category, source, png in synthetic_negative_files(data, train, config.exposure_slices):
        try:
            inputs.append(load_scan(png, size))
        except ImageError:
            continue
        categories.append(category)
        sources.append(source)
        names.append("")
    rng = np.random.default_rng(config.seed + 20261202)
    train_u8 = _to_u8(data.images[train])
    for i in np.linspace(0, len(train) - 1, min(config.ct_like, len(train))).astype(int):
        inputs.append(ood_sets.ct_like(train_u8[i, :, :, 0], rng)[..., None].astype(np.float32) / 255)
        categories.append("exposure_ct_like")
        sources.append(ood_sets.made_from_slices(collections[train[i]]))
        names.append("")
    side = guardnet.GUARD_SIDE
    return GuardData(guardnet.shrink(train_u8, side), collections[train],
                     guardnet.shrink(_to_u8(data.images[val]), side), collections[val],
                     guardnet.shrink(_to_u8(np.stack(inputs)), side), np.array(categories),
                     np.array(sources), np.array(names))


def fit_distance(net: guardnet.GuardNet, positives: np.ndarray, val: np.ndarray,
                 config: GuardConfig) -> float:
    """Fit "brain_distance" on `positives` (sets `net.embedding`); return its bound on `val`."""
    _, features = net.measure(positives)
    net.embedding = ood.fit_gaussian(features, config.distance_shrinkage)
    distances = net.distances(net.measure(val)[1])
    margin = ood.choose_margin(distances, config.distance_tail, config.max_distance_refusal)
    return float(ood._bound(distances, "high", config.distance_tail, margin)[1])


def margins(net: guardnet.GuardNet, images: np.ndarray, bound: float,
            distance_bound: float) -> tuple[np.ndarray, np.ndarray]:
    """How far each image lies inside the logit's and the distance's bound (negative: refused)."""
    scores = net.scores(images)
    return scores["brain_likeness"] - bound, distance_bound - scores["brain_distance"]


def _train_and_bound(data: GuardData, keep_neg: np.ndarray, keep_pos: np.ndarray,
                     config: GuardConfig, progress) -> tuple[guardnet.GuardNet, float, float]:
    """Train on the kept images; the logit's and the distance's bound (validation slices)."""
    model = train_guardnet(data.positives[keep_pos], data.collections[keep_pos],
                           data.negatives[keep_neg], data.categories[keep_neg], config, progress)
    net = guardnet.GuardNet(model)
    # Bound on the validation slices of the collections it trained on only.
    trained = np.isin(data.val_collections, np.unique(data.collections[keep_pos]))
    low, _ = ood._bound(net.logits(data.val[trained]), "low", config.tail, config.margin)
    distance_bound = fit_distance(net, data.positives[keep_pos], data.val[trained], config)
    return net, float(low), distance_bound


def held_out(data: GuardData, config: GuardConfig, categories: list[str] | None = None,
             progress=None) -> dict[str, Any]:
    """Retrain without each real category (and each brain collection) and measure what it missed.

    Returns per-category tallies, every held-out real image's margins inside the fold's two
    bounds ("margins": logit minus its bound; "distance_margins": bound minus distance;
    negative: refused), and for each brain collection left out the share of its validation
    slices refused by a network that never saw that collection.
    """
    categories = categories or sorted(set(data.categories[data.real].tolist()))
    report: dict[str, Any] = {"categories": {}, "margins": {}, "distance_margins": {},
                              "collections": {}}
    everyone = np.ones(len(data.positives), bool)
    for category in categories:
        out = data.categories == category
        net, bound, distance_bound = _train_and_bound(data, ~out, everyone, config, progress)
        record_fold(report, category, data.names[out],
                    *margins(net, data.negatives[out], bound, distance_bound))
        refused = report["categories"][category]["refused"]
        if progress:
            progress(f"held out {category}: refused {refused}/{int(out.sum())}")
    for collection in sorted(set(data.collections.tolist())):
        keep = data.collections != collection
        if len(set(data.collections[keep].tolist())) == 0:
            continue
        # Nor the negatives made from its slices (patches, inversions, CT look-alikes): they
        # would teach the fold that collection's look as "not brain".
        negatives = data.sources != ood_sets.made_from_slices(collection)
        net, bound, distance_bound = _train_and_bound(data, negatives, keep, config, progress)
        theirs = data.val_collections == collection
        rate = float((np.minimum(*margins(net, data.val[theirs], bound, distance_bound)) < 0).mean())
        report["collections"][collection] = {"images": int(theirs.sum()),
                                             "falsely_refused": round(rate, 4)}
        if progress:
            progress(f"held out brain collection {collection}: {rate:.3f} of its val refused")
    tallies = report["categories"].values()
    images = sum(t["images"] for t in tallies)
    report["overall"] = round(sum(t["refused"] for t in tallies) / images, 4) if images else None
    report["rule"] = ("each real category refused by a guard network trained without it, at "
                      "the logit's and the distance's bounds set on validation (refused when "
                      "either margin is negative); each brain collection's validation slices "
                      "judged by a network trained without that collection and without the "
                      "negatives made from its slices")
    report["folds_not_run"] = sorted(set(data.categories[data.real].tolist()) - set(categories))
    return report


def record_fold(report: dict[str, Any], category: str, names: np.ndarray,
                logit_margins: np.ndarray, distance_margins: np.ndarray) -> None:
    """Enter one held-out category's margins and tally (refused: either margin negative)."""
    refused = int((np.minimum(logit_margins, distance_margins) < 0).sum())
    report["categories"][category] = {"images": len(names), "refused": refused,
                                      "rate": round(refused / max(len(names), 1), 4)}
    report["margins"].update({name: round(float(m), 4) for name, m in zip(names, logit_margins)})
    report["distance_margins"].update({name: round(float(m), 4)
                                       for name, m in zip(names, distance_margins)})


def fit(data: GuardData, out_path: Path, config: GuardConfig = GuardConfig(),
        held_out_report: dict[str, Any] | None = None, command: str | None = None,
        splits_sha256: str | None = None, progress=None) -> dict[str, Any]:
    """Train on everything, set the bound on validation, write `<out>.h5` and `<out>.json`."""
    started = time.monotonic()
    net, bound, distance_bound = _train_and_bound(data, np.ones(len(data.negatives), bool),
                                                  np.ones(len(data.positives), bool), config,
                                                  progress)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    net.model.save(out_path)
    onnx_sha256 = guardnet.write_onnx(net.model, out_path.with_suffix(".onnx"))
    logit_margins, distance_margins = margins(net, data.val, bound, distance_bound)
    refused = np.minimum(logit_margins, distance_margins) < 0
    block = {
        "format": guardnet.GUARD_FORMAT,
        "side": guardnet.GUARD_SIDE,
        "preprocessing_version": PREPROCESSING_VERSION,
        "bound": round(bound, 6),
        "sha256": hashlib.sha256(out_path.read_bytes()).hexdigest(),
        "onnx_sha256": onnx_sha256,
        "embedding": guardnet.embedding_to_metadata(*net.embedding, distance_bound,
                                                    fitted_on="train (every positive)"),
        # Refused by either check, as served.
        "val_refusal_rate": {c: round(float(refused[data.val_collections == c].mean()), 4)
                             for c in sorted(set(data.val_collections.tolist()))},
        "positives": dict(sorted(Counter(data.collections.tolist()).items())),
        "negatives": dict(sorted(Counter(data.categories.tolist()).items())),
        "config": asdict(config),
        **({"splits_sha256": splits_sha256} if splits_sha256 else {}),
        "wall_seconds": round(time.monotonic() - started, 1),
        **({"command": command} if command else {}),
        **({"held_out": held_out_report} if held_out_report else {}),
    }
    out_path.with_suffix(".json").write_text(json.dumps(block, indent=2) + "\n")
    return block
