"""Train the guard network (`guardnet.py`) and measure it on kinds of image it never saw.

Positives are the training split of every brain collection (the models' own split manifest, so
no validation or test slice is ever trained on), with sagittal and coronal reformats of axial
stacks and zoomed-in copies; negatives are the real images of `ood_train/` and synthetic ones
(`ood_sets`: patches and inversions of training slices, head-CT look-alikes, noise, gradients,
text, checkerboards, blanks). The shipped network is a logistic head on a frozen ImageNet trunk
(`guard_trunk.py`); `GuardConfig(network="cnn")` trains the small CNN it replaced. Its refusal
bound is set on the validation slices of every collection, and so is the bound of its one-class
"brain_distance" (to the nearest k-means prototype of the training slices' features).
`--held-out` refits once per real category left out (and once per source of it, and per brain
collection) and records, for every held-out image, how far it lay inside both bounds of the
network that never saw its kind: that is the figure the guard is judged by.

Brain folders without labels (`harvard_mri/`: slices of many diseases, never a class) are
positives too (`load_unlabelled`). A collection the model's manifest does not cover (`brats/`
before a classifier trains on it, `harvard_mri/` always) is split here by `splits.split_dataset`,
which splits each collection by patient on its own with the manifest's seed: a classifier that
later trains on it gets the same split, so its held-out patients stay held out of the guard too.
The guard's own manifest is written beside it (`<out>.splits.json`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import numpy as np

from ..imaging import ImageError
from ..imaging import PREPROCESSING_VERSION
from ..imaging import load_scan
from ..imaging import preprocess
from ..inference import guardnet
from ..inference import ood
from . import guard_trunk
from . import ood_sets
from . import reformats
from . import splits as splitting
from .dataset import CachedDataset
from .dataset import concatenate
from .dataset import discover
from .dataset import iter_image_files
from .dataset import load_datasets
from .dataset import sequence_of

__all__ = ["GuardConfig", "GuardData", "assemble", "complete_manifest", "default_unlabelled_roots",
           "drop_listed", "fit", "fit_distance", "load_unlabelled", "margins", "record_fold",
           "sample_epoch", "train_guardnet", "UNLABELLED"]

# The label of every slice of a brain folder without labels: a positive for the guard, never a
# class (`load_unlabelled`).
UNLABELLED = "unlabelled"


@dataclass(frozen=True)
class GuardConfig:
    """How the guard network is trained and bounded (the defaults are the shipped recipe)."""

    # "trunk": a frozen ImageNet Lite0 trunk with a fitted linear head (`guard_trunk.py`), the
    # shipped recipe; "cnn": the small network trained from scratch (`guardnet.build_guardnet`),
    # its predecessor, kept for comparison. The next five fields are the CNN's only.
    network: str = "trunk"
    epochs: int = 12
    epoch_images: int = 3072
    batch_size: int = 64
    width: int = 16
    learning_rate: float = 2e-3
    # Share of each epoch drawn from brain slices; the rest are negatives, equal per category.
    positive_share: float = 0.5
    head_c: float = 0.03  # the trunk's head: inverse L2 strength (chosen on the held-out folds)
    # The refusal bound: the `tail` quantile of validation logits (half the 1 % false-refusal
    # budget), widened by `margin` times its distance to the median (`ood._bound`). None: the
    # smallest margin whose cross-fitted refusal of validation slices stays under
    # `max_logit_refusal` (`ood.choose_margin`, as for the distance). The CNN recipe used 0: its
    # validation logits had a long low tail (LGG end slices of amplified noise, a few CT slices
    # in SARTAJ), so any widening put the bound below most negatives.
    tail: float = 0.005
    margin: float | None = None
    max_logit_refusal: float = 0.005
    # "brain_distance" (guardnet.py): its bound is the `distance_tail` quantile of validation
    # distances, widened by the smallest margin whose cross-fitted refusal of validation slices
    # stays under `max_distance_refusal` (`ood.choose_margin`), as for the classifier's features.
    distance_tail: float = 0.005
    max_distance_refusal: float = 0.005
    # 0.3, not the 1 % of the classifier's distances: with SARTAJ left out of training, 1 %
    # refused 14.9 % of its validation slices and 0.3 refused 10.0 % (logit alone 9.2 %) for
    # nearly the same held-out head CT (57.5 vs 55.7 %); a new collection matters more.
    distance_shrinkage: float = 0.3
    # "brain_distance" to the nearest of this many k-means centres of the training slices'
    # features (`ood.fit_prototypes`) rather than to one Gaussian (0: the Gaussian, with
    # `distance_shrinkage`; the CNN recipe's). With each category held out, the distance alone
    # refused 83 % of it against 49 % for the Gaussian (train-guard --held-out; README -> Trust).
    prototypes: int = 1024
    ct_like: int = 1500  # head-CT look-alikes made from training slices (`ood_sets.ct_like`)
    # Head-CT look-alikes whose signal voids turn to bone or air (`ood_sets.ct_bone_air`): with
    # head CT held out, the logit refused 66 of its 106 images with them, 48 without (train-guard
    # --held-out; README -> Trust).
    ct_bone_air: int = 1500
    # Sagittal and coronal reformats of axial-only collections' stacks (`reformats.py`) as
    # positives (training patients) and bound slices (validation patients): brain MRI in the
    # planes LGG lacks. Without them a guard learns "axial" as LGG's look (README -> Trust).
    reformats: bool = True
    # Training slices cropped to a window inside the head (65-90 % of the side) and preprocessed
    # again, as positives: teaching files zoom in so that the head fills the frame and is cut by
    # it, which every LGG slice and most SARTAJ ones lack (README -> Trust).
    zoomed_in: int = 2000
    zoom_range: tuple[float, float] = (0.65, 0.9)
    exposure_slices: int = 1500  # training slices whose patch and inversion are negatives
    # `held_out` also refits once per source of every category with several (the category's
    # other sources kept): what the guard refuses of a new source of a kind it knows. Seconds
    # per fold for the trunk; the CLI turns it off for the CNN (18 min per fold).
    source_folds: bool = True
    seed: int = 0

    @classmethod
    def cnn(cls, **overrides: Any) -> GuardConfig:
        """The small CNN's recipe (`train-guard --network cnn`): its logit bounded at the bare
        validation tail (see `margin`), its distance to one Gaussian, and no source folds
        (18 min each)."""
        return cls(**{"network": "cnn", "margin": 0.0, "source_folds": False, "prototypes": 0,
                      **overrides})


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
    # Which val slices are sagittal or coronal reformats (`reformats.py`); None: none are.
    val_reformatted: np.ndarray | None = None
    val_sequences: np.ndarray | None = None  # MRI sequence of each val slice; None: not known
    # The test split of every collection (never trained or bounded on), as the model inputs an
    # upload of each file gives (float, not shrunk: the served network shrinks them itself, and a
    # slice right at a bound can fall either side of it when rounded to 8 bits first): what the
    # fitted guard refuses of it is recorded beside the validation figures.
    test: np.ndarray | None = None
    test_collections: np.ndarray | None = None
    test_sequences: np.ndarray | None = None
    manifest: dict | None = None  # the split manifest used, completed (`complete_manifest`)
    # Trunk features of positives, negatives and val, computed once (`trunk_features_of`), and
    # the positives' k-means centres, once per set of positives (`_prototype_centres`).
    features: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def val_native(self) -> np.ndarray:
        """Mask of the validation slices as their collection holds them (not reformats)."""
        if self.val_reformatted is None:
            return np.ones(len(self.val), bool)
        return ~self.val_reformatted

    @property
    def real(self) -> np.ndarray:
        """Mask of the real (not synthetic) negatives."""
        return self.names != ""


def _to_u8(images: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(images, np.float32) * 255.0), 0, 255).astype(np.uint8)


def zoomed_in(image: np.ndarray, rng: np.random.Generator,
              zoom_range: tuple[float, float] = (0.65, 0.9)) -> np.ndarray:
    """A preprocessed slice (H, W) cropped to a random square window of `zoom_range` of its
    side and sent through `preprocess` again: the same head, zoomed in and cut by the frame."""
    side = image.shape[0]
    crop = int(round(side * rng.uniform(*zoom_range)))
    top, left = rng.integers(0, side - crop + 1, 2)
    window = np.asarray(image, np.float32)[top:top + crop, left:left + crop]
    return preprocess(window, side)[..., 0]


def drop_listed(indices: np.ndarray, paths: list[str], listed: set[str]) -> np.ndarray:
    """`indices` less those whose path is in `listed` (`trust.listed_not_mri`), in order."""
    return np.array([i for i in indices if paths[i] not in listed], int)


# `harvard_mri/` names its slices `<folder>_<case><3-digit slice>` (its README): neighbouring
# numbers are neighbouring slices of one case, so the case prefix is the patient. The folder is
# left out of the patient: a case may sit in more than one of the atlas's folders.
_CASE_SLICE = re.compile(r"^.+_(?P<case>\d+)(?P<slice>\d{3})$")


def _unlabelled_patient(path: Path) -> str:
    match = _CASE_SLICE.match(path.stem)
    return f"case {match['case']}" if match else ""


def load_unlabelled(root: Path, size: int) -> CachedDataset:
    """Brain MRI slices without labels (every image file under `root`) as a data set whose
    labels are all `UNLABELLED`: positives and false-refusal checks for the guard, never a class.

    Decoded as `load_dataset` does (`imaging.decode_image`, then `imaging.preprocess`); each
    slice's patient is its case (`<folder>_<case><3-digit slice>` file names), else "" (the
    split then groups near-duplicates). Files the decoder refuses are listed in `errors`.
    """
    from ..imaging import decode_image
    from ..imaging import preprocess as preprocess_grey
    from .dedup import perceptual_hash

    root = Path(root).resolve()
    collection = root.name
    images, paths, hashes, sequences, patients, errors = [], [], [], [], [], {}
    for path in iter_image_files([root]):
        rel = f"{collection}/{path.relative_to(root).as_posix()}"
        try:
            grey = decode_image(path.read_bytes())
        except (ImageError, OSError) as exc:
            errors[rel] = getattr(exc, "message", type(exc).__name__)
            continue
        images.append(preprocess_grey(grey, size))
        hashes.append(perceptual_hash(grey))
        paths.append(rel)
        sequences.append(sequence_of(path))
        patients.append(_unlabelled_patient(path))
    n = len(paths)
    stacked = (np.stack(images).astype(np.float32) if images
               else np.zeros((0, size, size, 1), np.float32))
    return CachedDataset({collection: root}, stacked, [UNLABELLED] * n, ["train"] * n, paths,
                         np.array(hashes, dtype=np.uint64), errors, sequences, patients)


def default_unlabelled_roots() -> list[Path]:
    """Brain folders without labels the guard also learns from: `$BRAINMRI_UNLABELLED_DATA`
    (folders separated by the path separator; empty: none), else `harvard_mri/` beside the
    data sets (`../shared/data/harvard_mri`) when it is there."""
    listed = os.environ.get("BRAINMRI_UNLABELLED_DATA")
    if listed is not None:
        return [Path(p) for p in listed.split(os.pathsep) if p]
    default = ood_sets.default_ood_root().parent / "harvard_mri"
    return [default] if default.is_dir() else []


def _is_labelled(root: Path) -> bool:
    try:
        discover(root)
    except ValueError:
        return False
    return True


def complete_manifest(manifest: dict, data: CachedDataset) -> dict:
    """`manifest` with a split of every collection of `data` it does not cover.

    Each such collection is split on its own by `splits.split_dataset` with the manifest's seed
    and group distance (by patient where it names them): the split a classifier trained on it
    with that seed gets, whatever other collections it loads. Its collections are listed
    under "split_here".
    """
    covered = splitting.trained_collections(manifest)
    missing = [c for c in data.roots if c not in covered]
    if not missing:
        return manifest
    collections = np.array(data.collections)
    idx = np.flatnonzero(np.isin(collections, missing))
    plan = splitting.split_dataset(
        data.subset(idx), seed=int(manifest.get("seed", 42)),
        group_distance=int(manifest.get("group_distance", splitting.dedup.DEFAULT_MAX_DISTANCE)))
    splits = {name: list(paths) for name, paths in splitting.manifest_splits(manifest).items()}
    for name in (*splitting.SPLITS, splitting.OFFICIAL_TEST):
        added = [data.paths[i] for i, where in zip(idx, plan.assignment) if where == name]
        if added or name in splits:
            splits[name] = splits.get(name, []) + added
    return {"root": "+".join([*covered, *missing]), "collections": [*covered, *missing],
            "seed": int(manifest.get("seed", 42)),
            "group_distance": int(manifest.get("group_distance",
                                               splitting.dedup.DEFAULT_MAX_DISTANCE)),
            "split_here": [*manifest.get("split_here", []), *missing],
            "splits": dict(sorted(splits.items()))}


def assemble(data_roots: list[Path], manifest: dict, ood_root: Path, size: int = 128,
             config: GuardConfig = GuardConfig(), cache_dir: Path | None = None,
             progress=None, unlabelled_roots: list[Path] | None = None) -> GuardData:
    """Load positives (train/val of `manifest`, less slices an audit found not to be MRI),
    real negatives and synthetic negatives.

    `data_roots` may include brain folders without labels (`load_unlabelled`), and so may
    `unlabelled_roots` (default `default_unlabelled_roots()`; one already in `data_roots` is
    loaded once). Collections `manifest` does not cover are split here (`complete_manifest`).
    """
    from .trust import _split_indices
    from .trust import listed_not_mri
    from .trust import synthetic_negative_files

    roots = [Path(r) for r in data_roots]
    extra = default_unlabelled_roots() if unlabelled_roots is None else list(unlabelled_roots)
    named = {r.resolve().name for r in roots}
    roots += [Path(r) for r in extra if Path(r).resolve().name not in named]
    labelled = [r for r in roots if _is_labelled(r)]
    parts = [load_datasets(labelled, size, cache_dir=cache_dir, progress=progress)] if labelled else []
    parts += [load_unlabelled(r, size) for r in roots if r not in labelled]
    data = concatenate(parts)
    manifest = complete_manifest(manifest, data)
    splits = _split_indices(data, manifest)
    collections = np.array(data.collections)
    sequences = np.array(data.sequences)
    # Head CT filed among SARTAJ's MRI (audits/*.tsv) is no brain MRI slice: the guard must not
    # learn it as one, nor make patches and inversions of it.
    train = drop_listed(splits["train"], data.paths, listed_not_mri())
    val = splits["val"]
    test = drop_listed(splits.get("test", np.zeros(0, int)), data.paths, listed_not_mri())
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
    # The bone-and-air look-alikes draw from their own generator, so that adding them left every
    # other drawn image (CT look-alikes, zoomed-in positives) as it was.
    for category, make, count, draws in (
            ("exposure_ct_like", ood_sets.ct_like, config.ct_like, rng),
            ("exposure_ct_bone_air", ood_sets.ct_bone_air, config.ct_bone_air,
             np.random.default_rng(config.seed + 20261203))):
        for i in np.linspace(0, len(train) - 1, min(count, len(train))).astype(int):
            inputs.append(make(train_u8[i, :, :, 0], draws)[..., None].astype(np.float32) / 255)
            categories.append(category)
            sources.append(ood_sets.made_from_slices(collections[train[i]]))
            names.append("")
    side = guardnet.GUARD_SIDE
    positives, val_u8 = [train_u8], [_to_u8(data.images[val])]
    positive_groups, val_groups = [collections[train]], [collections[val]]
    val_reformatted = [np.zeros(len(val), bool)]
    val_sequences = [sequences[val]]
    if config.zoomed_in:
        picked = np.linspace(0, len(train) - 1, min(config.zoomed_in, len(train))).astype(int)
        positives.append(_to_u8(np.stack([zoomed_in(train_u8[i, :, :, 0], rng,
                                                     config.zoom_range)[..., None]
                                          for i in picked])))
        positive_groups.append(collections[train[picked]])
    if config.reformats:
        for split, images, groups in ((train, positives, positive_groups),
                                      (val, val_u8, val_groups)):
            for collection in sorted(set(collections[split].tolist())):
                mine = split[collections[split] == collection]
                made = reformats.reformats([data.file(i) for i in mine])
                if made:
                    images.append(_to_u8(np.stack([load_scan(r.png(), size) for r in made])))
                    groups.append(np.full(len(made), collection))
                    if split is val:
                        val_reformatted.append(np.ones(len(made), bool))
                        val_sequences.append(np.array([r.sequence for r in made]))
    return GuardData(guardnet.shrink(np.concatenate(positives), side),
                     np.concatenate(positive_groups),
                     guardnet.shrink(np.concatenate(val_u8), side), np.concatenate(val_groups),
                     guardnet.shrink(_to_u8(np.stack(inputs)), side), np.array(categories),
                     np.array(sources), np.array(names), np.concatenate(val_reformatted),
                     val_sequences=np.concatenate(val_sequences),
                     test=data.images[test],
                     test_collections=collections[test], test_sequences=sequences[test],
                     manifest=manifest)


def trunk_features_of(data: GuardData, progress=None) -> dict[str, np.ndarray]:
    """The trunk's features of every positive, negative and validation slice (computed once:
    the trunk is frozen, so every fold reuses them)."""
    if not data.features:
        trunk = guard_trunk.build_trunk(data.positives.shape[1])
        for name in ("positives", "negatives", "val"):
            data.features[name] = guard_trunk.trunk_features(trunk, getattr(data, name))
            if progress:
                progress(f"trunk features of the {name}: {len(data.features[name])}")
    return data.features


def fit_distance(net: guardnet.GuardNet, positives: np.ndarray, val: np.ndarray,
                 config: GuardConfig) -> float:
    """Fit "brain_distance" on `positives` (sets `net.embedding`); return its bound on `val`."""
    _, features = net.measure(positives)
    if config.prototypes:
        clusters = ood.fit_prototypes(features, config.prototypes, config.seed)
        net.embedding = guardnet.PrototypeFit(ood.cluster_means(features, clusters))
    else:
        net.embedding = guardnet.GaussianFit(*ood.fit_gaussian(features,
                                                                config.distance_shrinkage))
    return _distance_bound(net.distances(net.measure(val)[1]), config)


def _distance_bound(distances: np.ndarray, config: GuardConfig) -> float:
    """The distance's bound: its validation tail, widened by the cross-fitted margin."""
    margin = ood.choose_margin(distances, config.distance_tail, config.max_distance_refusal)
    return float(ood._bound(distances, "high", config.distance_tail, margin)[1])


def _refused(net: guardnet.GuardNet, images: np.ndarray, bound: float,
             distance_bound: float) -> np.ndarray:
    """Refused by either bound of the served network."""
    return np.minimum(*margins(net, images, bound, distance_bound)) < 0


def margins(net: guardnet.GuardNet, images: np.ndarray, bound: float,
            distance_bound: float) -> tuple[np.ndarray, np.ndarray]:
    """How far each image lies inside the logit's and the distance's bound (negative: refused)."""
    scores = net.scores(images)
    return scores["brain_likeness"] - bound, distance_bound - scores["brain_distance"]


@dataclass
class FittedGuard:
    """One trained guard network with both bounds set on validation."""

    bound: float  # of the logit ("brain_likeness")
    distance_bound: float
    embedding: guardnet.GaussianFit | guardnet.PrototypeFit  # the "brain_distance" fit
    # (which, mask) -> (logit margins, distance margins) of data.<which>[mask]; negative: refused
    margins: Callable[[str, np.ndarray], tuple[np.ndarray, np.ndarray]]
    model: Callable[[], Any]  # the servable Keras model
    logit_margin: float | None = None  # the widening the logit's bound was set with


def _logit_margin(logits: np.ndarray, config: GuardConfig) -> float:
    if config.margin is not None:
        return config.margin
    # `choose_margin` bounds a high tail: the logit's low tail, negated.
    return ood.choose_margin(-logits, config.tail, config.max_logit_refusal)


def _logit_bound(logits: np.ndarray, config: GuardConfig, margin: float | None = None) -> float:
    """The logit's bound: its validation tail, widened by `margin` (default `_logit_margin`)."""
    margin = _logit_margin(logits, config) if margin is None else margin
    return float(ood._bound(logits, "low", config.tail, margin)[0])


def _train_and_bound(data: GuardData, keep_neg: np.ndarray, keep_pos: np.ndarray,
                     config: GuardConfig, progress) -> FittedGuard:
    """Train on the kept images; the logit's and the distance's bound (validation slices of the
    collections it trained on only)."""
    trained = np.isin(data.val_collections, np.unique(data.collections[keep_pos]))
    if config.network == "trunk":
        return _fit_trunk(data, keep_neg, keep_pos, trained, config, progress)
    if config.network != "cnn":
        raise ValueError(f"unknown guard network {config.network!r} (trunk or cnn)")
    model = train_guardnet(data.positives[keep_pos], data.collections[keep_pos],
                           data.negatives[keep_neg], data.categories[keep_neg], config, progress)
    net = guardnet.GuardNet(model)
    val_logits = net.logits(data.val[trained])
    logit_margin = _logit_margin(val_logits, config)
    low = _logit_bound(val_logits, config, logit_margin)
    distance_bound = fit_distance(net, data.positives[keep_pos], data.val[trained], config)
    return FittedGuard(low, distance_bound, net.embedding,
                       lambda which, mask: margins(net, getattr(data, which)[mask], low,
                                                   distance_bound),
                       lambda: model, logit_margin)


def _fit_trunk(data: GuardData, keep_neg: np.ndarray, keep_pos: np.ndarray, trained: np.ndarray,
               config: GuardConfig, progress) -> FittedGuard:
    """The trunk recipe: fit the head on cached features; score in feature space (the served
    network computes exactly these, `guard_trunk.guard_model`)."""
    features = trunk_features_of(data, progress)
    head = guard_trunk.fit_head(features["positives"][keep_pos], data.collections[keep_pos],
                                features["negatives"][keep_neg], data.categories[keep_neg],
                                config.head_c)
    if config.prototypes:
        embedding = guard_trunk.prototypes_of(head, _prototype_centres(data, keep_pos, config))
    else:
        embedding = guard_trunk.distance_of(head, features["positives"][keep_pos],
                                            config.distance_shrinkage)

    def scores(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return head.logits(rows), embedding.distance(head.standardise(rows))

    val_logits, val_distances = scores(features["val"][trained])
    logit_margin = _logit_margin(val_logits, config)
    low = _logit_bound(val_logits, config, logit_margin)
    distance_bound = _distance_bound(val_distances, config)

    def fold_margins(which: str, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, distances = scores(features[which][mask])
        return logits - low, distance_bound - distances

    return FittedGuard(low, distance_bound, embedding, fold_margins,
                       lambda: guard_trunk.guard_model(
                           guard_trunk.build_trunk(data.positives.shape[1]), head),
                       logit_margin)


def _prototype_centres(data: GuardData, keep_pos: np.ndarray, config: GuardConfig) -> np.ndarray:
    """The kept positives' k-means cluster centres in trunk features, found once per set of
    positives (every category and source fold keeps all of them; only the collection folds
    differ)."""
    key = "prototype centres " + hashlib.sha256(np.packbits(keep_pos).tobytes()).hexdigest()
    if key not in data.features:
        kept = data.features["positives"][keep_pos]
        data.features[key] = ood.cluster_means(
            kept, guard_trunk.cluster_positives(kept, config.prototypes, config.seed))
    return data.features[key]


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
    if config.source_folds:
        report.update(sources={}, source_margins={}, source_distance_margins={})
    everyone = np.ones(len(data.positives), bool)
    for category in categories:
        out = data.categories == category
        fold = _train_and_bound(data, ~out, everyone, config, progress)
        record_fold(report, category, data.names[out], *fold.margins("negatives", out))
        refused = report["categories"][category]["refused"]
        if progress:
            progress(f"held out {category}: refused {refused}/{int(out.sum())}")
        if config.source_folds:
            _source_folds(data, category, config, report, progress)
    for collection in sorted(set(data.collections.tolist())):
        keep = data.collections != collection
        if len(set(data.collections[keep].tolist())) == 0:
            continue
        # Nor the negatives made from its slices (patches, inversions, CT look-alikes): they
        # would teach the fold that collection's look as "not brain".
        negatives = data.sources != ood_sets.made_from_slices(collection)
        fold = _train_and_bound(data, negatives, keep, config, progress)
        theirs = data.val_collections == collection
        refused = np.minimum(*fold.margins("val", theirs)) < 0
        native = data.val_native[theirs]
        rate = float(refused[native].mean())
        # Its own slices as they come; the reformats (planes it lacks) apart, as evaluate does.
        report["collections"][collection] = {"images": int(native.sum()),
                                             "falsely_refused": round(rate, 4)}
        if (~native).any():
            report["collections"][collection]["reformats"] = {
                "images": int((~native).sum()),
                "falsely_refused": round(float(refused[~native].mean()), 4)}
        if data.val_sequences is not None:
            report["collections"][collection]["by_sequence"] = _by_sequence(
                refused[native], data.val_sequences[theirs][native])
        if progress:
            progress(f"held out brain collection {collection}: {rate:.3f} of its val refused"
                     + (f" ({refused[~native].mean():.3f} of its reformats)"
                        if (~native).any() else ""))
    tallies = report["categories"].values()
    images = sum(t["images"] for t in tallies)
    report["overall"] = round(sum(t["refused"] for t in tallies) / images, 4) if images else None
    report["rule"] = ("each real category refused by a guard network trained without it, at "
                      "the logit's and the distance's bounds set on validation (refused when "
                      "either margin is negative); each brain collection's validation slices "
                      "judged by a network trained without that collection and without the "
                      "negatives made from its slices"
                      + ("; each source of a category with several judged by a network trained "
                         "without that source alone (source_margins)" if config.source_folds
                         else ""))
    report["folds_not_run"] = sorted(set(data.categories[data.real].tolist()) - set(categories))
    return report


def _source_folds(data: GuardData, category: str, config: GuardConfig, report: dict[str, Any],
                  progress) -> None:
    """One fold per source of `category` (when it has several): trained without that source's
    images only, so the category's other sources still teach it."""
    sources = sorted(set(data.sources[data.categories == category].tolist()))
    if len(sources) < 2:
        return
    everyone = np.ones(len(data.positives), bool)
    report["sources"][category] = {}
    for source in sources:
        out = (data.categories == category) & (data.sources == source)
        fold = _train_and_bound(data, ~out, everyone, config, progress)
        logit_margins, distance_margins = fold.margins("negatives", out)
        report["sources"][category][source] = _fold_tally(logit_margins, distance_margins)
        _record_margins(report, data.names[out], logit_margins, distance_margins, "source_")
    if progress:
        tally = report["sources"][category].values()
        progress(f"  {category}, one source out at a time: refused "
                 f"{sum(t['refused'] for t in tally)}/{sum(t['images'] for t in tally)}")


def _by_sequence(refused: np.ndarray, sequences: np.ndarray) -> dict[str, dict[str, Any]]:
    """{sequence: {"images", "falsely_refused"}} of the slices whose file names a sequence."""
    return {sequence: {"images": int((sequences == sequence).sum()),
                       "falsely_refused": round(float(refused[sequences == sequence].mean()), 4)}
            for sequence in sorted(set(sequences.tolist()) - {"unspecified"})}


def _refusals_by_collection(refused: np.ndarray, collections: np.ndarray,
                            sequences: np.ndarray | None) -> dict[str, dict[str, Any]]:
    """Refused share of each collection's slices (and of each sequence in it)."""
    out = {}
    for collection in sorted(set(collections.tolist())):
        mine = collections == collection
        out[collection] = {"images": int(mine.sum()),
                           "falsely_refused": round(float(refused[mine].mean()), 4),
                           "refused": int(refused[mine].sum())}
        if sequences is not None and set(sequences[mine].tolist()) - {"unspecified"}:
            out[collection]["by_sequence"] = _by_sequence(refused[mine], sequences[mine])
    return out


def _served(net: guardnet.GuardNet, out_path: Path) -> guardnet.GuardNet:
    """The network as a worker runs it: its ONNX copy when onnxruntime is there (a slice right
    at a bound can fall either side of it in Keras and in ONNX)."""
    import importlib.util

    onnx = Path(out_path).with_suffix(".onnx")
    if onnx.is_file() and importlib.util.find_spec("onnxruntime"):
        return guardnet.GuardNet(onnx_path=onnx, embedding=net.embedding)
    return net


def refusals_of_test_split(net: guardnet.GuardNet, data: GuardData, bound: float,
                 distance_bound: float) -> dict[str, dict[str, Any]]:
    """What `net` refuses of each collection's test split (and of each sequence in it)."""
    return _refusals_by_collection(_refused(net, data.test, bound, distance_bound),
                                   data.test_collections, data.test_sequences)


def record_fold(report: dict[str, Any], category: str, names: np.ndarray,
                logit_margins: np.ndarray, distance_margins: np.ndarray) -> None:
    """Enter one held-out category's margins and tally (refused: either margin negative)."""
    report["categories"][category] = _fold_tally(logit_margins, distance_margins)
    _record_margins(report, names, logit_margins, distance_margins)


def _fold_tally(logit_margins: np.ndarray, distance_margins: np.ndarray) -> dict[str, Any]:
    refused = int((np.minimum(logit_margins, distance_margins) < 0).sum())
    images = len(logit_margins)
    return {"images": images, "refused": refused, "rate": round(refused / max(images, 1), 4)}


def _record_margins(report: dict[str, Any], names: np.ndarray, logit_margins: np.ndarray,
                    distance_margins: np.ndarray, prefix: str = "") -> None:
    """Each image's margins, under `<prefix>margins` and `<prefix>distance_margins`."""
    report[f"{prefix}margins"].update(
        {name: round(float(m), 4) for name, m in zip(names, logit_margins)})
    report[f"{prefix}distance_margins"].update(
        {name: round(float(m), 4) for name, m in zip(names, distance_margins)})


def fit(data: GuardData, out_path: Path, config: GuardConfig = GuardConfig(),
        held_out_report: dict[str, Any] | None = None, command: str | None = None,
        splits_sha256: str | None = None, progress=None) -> dict[str, Any]:
    """Train on everything, set the bound on validation, write `<out>.h5` and `<out>.json` (and
    `<out>.splits.json`, the guard's manifest, when collections were split here)."""
    started = time.monotonic()
    fitted = _train_and_bound(data, np.ones(len(data.negatives), bool),
                              np.ones(len(data.positives), bool), config, progress)
    bound, distance_bound = fitted.bound, fitted.distance_bound
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    given_splits_sha256 = None
    if data.manifest is not None and data.manifest.get("split_here"):
        # The guard's own manifest (the model's, plus the collections split here) beside it.
        manifest_path = splitting.splits_path_for(out_path)
        manifest_path.write_text(json.dumps(data.manifest, indent=1) + "\n")
        given_splits_sha256 = splits_sha256
        splits_sha256 = hashlib.sha256(manifest_path.read_bytes()).hexdigest()
    model = fitted.model()
    model.save(out_path)
    onnx_sha256 = guardnet.write_onnx(model, out_path.with_suffix(".onnx"))
    # As served: the saved network's own forward pass, not the fit's feature-space scores.
    net = guardnet.GuardNet(model, embedding=fitted.embedding)
    logit_margins, distance_margins = margins(net, data.val, bound, distance_bound)
    refused = np.minimum(logit_margins, distance_margins) < 0
    block = {
        "format": guardnet.GUARD_FORMAT,
        "network": ("lite0-trunk (ImageNet, frozen) + logistic head" if config.network == "trunk"
                    else "small CNN trained from scratch"),
        "side": guardnet.GUARD_SIDE,
        "preprocessing_version": PREPROCESSING_VERSION,
        "bound": round(bound, 6),
        **({"bound_margin": fitted.logit_margin} if fitted.logit_margin is not None else {}),
        "sha256": hashlib.sha256(out_path.read_bytes()).hexdigest(),
        "onnx_sha256": onnx_sha256,
        "embedding": guardnet.embedding_to_metadata(net.embedding, distance_bound,
                                                    fitted_on="train (every positive)"),
        # Refused by either check, as served; reformats apart.
        "val_refusal_rate": {c: round(float(refused[(data.val_collections == c)
                                                    & data.val_native].mean()), 4)
                             for c in sorted(set(data.val_collections.tolist()))},
        **({"val_reformats_refusal_rate": {
            c: round(float(refused[(data.val_collections == c) & ~data.val_native].mean()), 4)
            for c in sorted(set(data.val_collections[~data.val_native].tolist()))}}
           if (~data.val_native).any() else {}),
        # The test split of every collection (never trained or bounded on), as served: by the
        # ONNX copy (`_served`), the network alone (the served guard's fixed rules, e.g.
        # almost-black files, come on top).
        **({"test_refusal": refusals_of_test_split(_served(net, out_path), data, bound, distance_bound)}
           if data.test is not None and len(data.test) else {}),
        "positives": dict(sorted(Counter(data.collections.tolist()).items())),
        "negatives": dict(sorted(Counter(data.categories.tolist()).items())),
        "config": asdict(config),
        **({"splits_sha256": splits_sha256} if splits_sha256 else {}),
        **({"splits_from_sha256": given_splits_sha256, "split_here": data.manifest["split_here"]}
           if given_splits_sha256 else {}),
        "wall_seconds": round(time.monotonic() - started, 1),
        **({"command": command} if command else {}),
        **({"held_out": held_out_report} if held_out_report else {}),
    }
    out_path.with_suffix(".json").write_text(json.dumps(block, indent=2) + "\n")
    return block
