"""Find labelled images on disk, decode and preprocess each once, and cache the result.

Decoding and resizing 3,000 JPEGs takes longer than an epoch of the small CNN on two cores, so
every image goes through `imaging.load_scan`'s steps exactly once per (data set, input size,
preprocessing version) and is stored as a float32 array next to its perceptual hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import imaging
from .dedup import perceptual_hash
from .modelcard import CLASSES

__all__ = [
    "IMAGE_SUFFIXES",
    "CachedDataset",
    "Sample",
    "default_cache_dir",
    "discover",
    "iter_image_files",
    "load_dataset",
    "normalise_class_name",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".dcm")

_CLASS_ALIASES = {
    "glioma": "glioma",
    "glioma_tumor": "glioma",
    "glioma_tumour": "glioma",
    "gliomas": "glioma",
    "meningioma": "meningioma",
    "meningioma_tumor": "meningioma",
    "meningioma_tumour": "meningioma",
    "meningiomas": "meningioma",
    "no_tumor": "no_tumor",
    "no_tumour": "no_tumor",
    "notumor": "no_tumor",
    "notumour": "no_tumor",
    "no": "no_tumor",
    "normal": "no_tumor",
    "healthy": "no_tumor",
    "pituitary": "pituitary",
    "pituitary_tumor": "pituitary",
    "pituitary_tumour": "pituitary",
    "pituitary_adenoma": "pituitary",
}
_TRAIN_FOLDERS = {"training", "train"}
_TEST_FOLDERS = {"testing", "test"}


def normalise_class_name(folder: str) -> str | None:
    """Map a class folder name (`glioma_tumor`, `No Tumor`, `notumor`, ...) to a canonical class."""
    key = re.sub(r"[\s\-]+", "_", folder.strip().lower())
    return _CLASS_ALIASES.get(key)


@dataclass(frozen=True)
class Sample:
    """One labelled image file; `source` is "train" or "test" (the official folder)."""

    path: Path
    label: str
    source: str


def iter_image_files(paths: list[Path]) -> list[Path]:
    """Files given directly plus image files found recursively under folders, sorted."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(
                p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
        else:
            found.append(path)
    return found


def _class_folders(folder: Path) -> list[tuple[Path, str]]:
    pairs = []
    for child in sorted(folder.iterdir()):
        if child.is_dir():
            label = normalise_class_name(child.name)
            if label is not None:
                pairs.append((child, label))
    return pairs


def discover(root: Path) -> list[Sample]:
    """List labelled images under `root`.

    Accepted layouts: `root/<Training|Testing>/<class>/*` and `root/<class>/*` (all "train").

    Raises:
        ValueError: when no class folder is recognised.
    """
    root = Path(root)
    splits: list[tuple[Path, str]] = []
    for child in sorted(root.iterdir()) if root.is_dir() else []:
        name = child.name.lower()
        if child.is_dir() and name in _TRAIN_FOLDERS:
            splits.append((child, "train"))
        elif child.is_dir() and name in _TEST_FOLDERS:
            splits.append((child, "test"))
    if not splits:
        splits = [(root, "train")]
    samples = []
    for folder, source in splits:
        for class_dir, label in _class_folders(folder):
            for path in iter_image_files([class_dir]):
                samples.append(Sample(path, label, source))
    if not samples:
        raise ValueError(
            f"No labelled images found under {root}. Expected class folders named like "
            f"{', '.join(CLASSES)} (or glioma_tumor, notumor, ...), optionally inside "
            "Training/ and Testing/."
        )
    return samples


def default_cache_dir() -> Path:
    """`$BRAINMRI_CACHE`, else `.cache/brainmri` under the current directory."""
    return Path(os.environ.get("BRAINMRI_CACHE", Path.cwd() / ".cache" / "brainmri"))


@dataclass
class CachedDataset:
    """Preprocessed images and what is known about each of them, index-aligned."""

    root: Path
    images: np.ndarray  # (N, size, size, 1) float32 in [0, 1]; NaN-free
    labels: list[str]
    sources: list[str]
    paths: list[str]  # relative to root, POSIX style
    hashes: np.ndarray  # (N,) uint64 perceptual hashes of the full decoded image
    errors: dict[str, str]  # relative path -> why it was skipped

    @property
    def label_indices(self) -> np.ndarray:
        """Integer labels in canonical class order."""
        return np.array([CLASSES.index(label) for label in self.labels], dtype=np.int64)


def _process_file(args: tuple[str, int]) -> tuple[np.ndarray | None, int, str | None]:
    path, size = args
    try:
        gray = imaging.decode_image(Path(path).read_bytes())
        return imaging.preprocess(gray, size), perceptual_hash(gray), None
    except (imaging.ImageError, OSError) as exc:
        return None, 0, getattr(exc, "message", type(exc).__name__)


def _fingerprint(samples: list[Sample], root: Path, size: int) -> str:
    digest = hashlib.sha256(f"v{imaging.PREPROCESSING_VERSION}:{size}".encode())
    for sample in samples:
        stat = sample.path.stat()
        rel = sample.path.relative_to(root).as_posix()
        digest.update(f"{rel}|{sample.label}|{sample.source}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def load_dataset(
    root: Path,
    size: int,
    cache_dir: Path | None = None,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> CachedDataset:
    """Discover, preprocess (once) and return the whole labelled data set under `root`.

    Args:
        root: data set folder (see `discover` for layouts).
        size: square input side of the model.
        cache_dir: where preprocessed arrays are kept (default `default_cache_dir()`).
        workers: decoding processes (default: all cores).
        progress: called with the number of images just processed (for a progress bar).
    """
    root = Path(root).resolve()
    samples = discover(root)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    key = _fingerprint(samples, root, size)
    array_path = cache_dir / f"{key}.npy"
    meta_path = cache_dir / f"{key}.json"
    if array_path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if progress:
            progress(len(samples))
        return CachedDataset(
            root, np.load(array_path, mmap_mode=None), meta["labels"], meta["sources"],
            meta["paths"], np.array(meta["hashes"], dtype=np.uint64), meta["errors"],
        )

    images, labels, sources, paths, hashes, errors = [], [], [], [], [], {}
    jobs = [(str(s.path), size) for s in samples]
    workers = workers or os.cpu_count() or 1
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for sample, (image, phash, error) in zip(samples, pool.map(_process_file, jobs, chunksize=16)):
            rel = sample.path.relative_to(root).as_posix()
            if image is None:
                errors[rel] = error or "unreadable"
            else:
                images.append(image)
                labels.append(sample.label)
                sources.append(sample.source)
                paths.append(rel)
                hashes.append(phash)
            if progress:
                progress(1)
    stacked = np.stack(images).astype(np.float32) if images else np.zeros((0, size, size, 1), np.float32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(array_path, stacked)
    meta_path.write_text(json.dumps({
        "root": str(root), "size": size, "labels": labels, "sources": sources, "paths": paths,
        "hashes": [int(h) for h in hashes], "errors": errors,
    }))
    return CachedDataset(root, stacked, labels, sources, paths, np.array(hashes, dtype=np.uint64), errors)
