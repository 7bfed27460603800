"""Find labelled images on disk, decode and preprocess each once, and cache the result.

Every image carries its collection (the data root's folder name), its MRI sequence (from a
`_t1` / `_t1c` / `_flair` / `_t2` file-name suffix, else "unspecified") and, where the data set
says so, its patient (a `slices.csv` with `slice` and `patient` columns, as in `lgg/`). Several
roots load into one `CachedDataset` whose paths are `<collection>/<path under the root>`, so a
split manifest names every image unambiguously.

Decoding and resizing 3,000 JPEGs takes longer than an epoch of the small CNN on two cores, so
every image goes through `imaging.load_scan`'s steps exactly once per (data set, input size,
preprocessing version) and is stored as a float32 array next to its perceptual hash.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import imaging
from .dedup import perceptual_hash
from ..inference import CLASSES

__all__ = [
    "IMAGE_SUFFIXES",
    "SEQUENCES",
    "CachedDataset",
    "Sample",
    "concatenate",
    "default_cache_dir",
    "discover",
    "iter_image_files",
    "load_dataset",
    "load_datasets",
    "no_head_in_view",
    "normalise_class_name",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".dcm")

# File-name suffixes that name an MRI sequence (`..._11_flair.jpg`); anything else is unspecified.
SEQUENCES = ("t1", "t1c", "t2", "flair")
UNSPECIFIED = "unspecified"

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
    sequence: str = UNSPECIFIED
    patient: str = ""  # empty when the data set does not say


def sequence_of(path: Path) -> str:
    """The MRI sequence a file name ends in (`x_flair.jpg` -> "flair"), else "unspecified"."""
    tail = path.stem.rsplit("_", 1)[-1].lower()
    return tail if tail in SEQUENCES else UNSPECIFIED


def _patients(root: Path) -> dict[str, str]:
    """slice id -> patient id from `root/slices.csv`, when the data set ships one."""
    table = root / "slices.csv"
    if not table.is_file():
        return {}
    with table.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"slice", "patient"} <= set(rows[0]):
        return {}
    return {row["slice"]: row["patient"] for row in rows}


def _patient_of(path: Path, patients: dict[str, str], sequence: str) -> str:
    stem = path.stem
    if sequence != UNSPECIFIED:
        stem = stem[: -len(sequence) - 1]
    return patients.get(stem, "")


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
    patients = _patients(root)
    samples = []
    for folder, source in splits:
        for class_dir, label in _class_folders(folder):
            for path in iter_image_files([class_dir]):
                sequence = sequence_of(path)
                samples.append(Sample(path, label, source, sequence,
                                      _patient_of(path, patients, sequence)))
    if not samples:
        raise ValueError(
            f"No labelled images found under {root}. Expected class folders named like "
            f"{', '.join(CLASSES)} (or glioma_tumor, notumor, ...), optionally inside "
            "Training/ and Testing/."
        )
    return samples


# A preprocessed slice with less tissue than this (pixels above 0.1) shows no head at all: the
# first and last slices of LGG volumes are black. 87 of 11,021 LGG images, no SARTAJ image.
MIN_TISSUE_FRACTION = 0.03


def no_head_in_view(images: np.ndarray) -> np.ndarray:
    """True for preprocessed slices that are (nearly) blank: no head to classify.

    They are neither trained nor scored as "no tumor" (a blank frame says nothing about a
    tumour), and the guard is right to refuse them; evaluation reports them on their own.
    """
    if len(images) == 0:
        return np.zeros(0, bool)
    return (np.asarray(images) > 0.1).reshape(len(images), -1).mean(axis=1) < MIN_TISSUE_FRACTION


def default_cache_dir() -> Path:
    """`$BRAINMRI_CACHE`, else `.cache/brainmri` under the current directory."""
    return Path(os.environ.get("BRAINMRI_CACHE", Path.cwd() / ".cache" / "brainmri"))


@dataclass
class CachedDataset:
    """Preprocessed images and what is known about each of them, index-aligned."""

    roots: dict[str, Path]  # collection name -> absolute data root
    images: np.ndarray  # (N, size, size, 1) float32 in [0, 1]; NaN-free
    labels: list[str]
    sources: list[str]
    paths: list[str]  # "<collection>/<path under its root>", POSIX style
    hashes: np.ndarray  # (N,) uint64 perceptual hashes of the full decoded image
    errors: dict[str, str]  # path -> why it was skipped
    sequences: list[str]
    patients: list[str]  # "" where the collection names no patient

    @property
    def label_indices(self) -> np.ndarray:
        """Integer labels in canonical class order."""
        return np.array([CLASSES.index(label) for label in self.labels], dtype=np.int64)

    @property
    def name(self) -> str:
        """The collections, joined: "sartaj" or "sartaj+lgg"."""
        return "+".join(self.roots)

    @property
    def collections(self) -> list[str]:
        """The collection of every image."""
        return [path.split("/", 1)[0] for path in self.paths]

    def file(self, index: int) -> Path:
        """The image file behind row `index`."""
        collection, rel = self.paths[index].split("/", 1)
        return self.roots[collection] / rel

    def subset(self, keep: np.ndarray) -> CachedDataset:
        """The rows in `keep` (indices), as a new data set."""
        pick = [int(i) for i in keep]
        return CachedDataset(
            self.roots, self.images[pick], [self.labels[i] for i in pick],
            [self.sources[i] for i in pick], [self.paths[i] for i in pick], self.hashes[pick],
            self.errors, [self.sequences[i] for i in pick], [self.patients[i] for i in pick])


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
        digest.update(f"{rel}|{sample.label}|{sample.source}|{sample.sequence}|{sample.patient}|"
                      f"{stat.st_size}|{stat.st_mtime_ns}\n".encode())
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
        root: data set folder (see `discover` for layouts); its name is the collection.
        size: square input side of the model.
        cache_dir: where preprocessed arrays are kept (default `default_cache_dir()`).
        workers: decoding processes (default: all cores).
        progress: called with the number of images just processed (for a progress bar).
    """
    root = Path(root).resolve()
    collection = root.name
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
            {collection: root}, np.load(array_path), meta["labels"], meta["sources"],
            meta["paths"], np.array(meta["hashes"], dtype=np.uint64), meta["errors"],
            meta["sequences"], meta["patients"],
        )

    images, labels, sources, paths, hashes, errors = [], [], [], [], [], {}
    sequences, patients = [], []
    jobs = [(str(s.path), size) for s in samples]
    workers = workers or os.cpu_count() or 1
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for sample, (image, phash, error) in zip(samples, pool.map(_process_file, jobs, chunksize=16)):
            rel = f"{collection}/{sample.path.relative_to(root).as_posix()}"
            if image is None:
                errors[rel] = error or "unreadable"
            else:
                images.append(image)
                labels.append(sample.label)
                sources.append(sample.source)
                paths.append(rel)
                hashes.append(phash)
                sequences.append(sample.sequence)
                patients.append(sample.patient)
            if progress:
                progress(1)
    stacked = np.stack(images).astype(np.float32) if images else np.zeros((0, size, size, 1), np.float32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(array_path, stacked)
    meta_path.write_text(json.dumps({
        "root": str(root), "size": size, "labels": labels, "sources": sources, "paths": paths,
        "hashes": [int(h) for h in hashes], "errors": errors, "sequences": sequences,
        "patients": patients,
    }))
    return CachedDataset({collection: root}, stacked, labels, sources, paths,
                         np.array(hashes, dtype=np.uint64), errors, sequences, patients)


def load_datasets(
    roots: Path | list[Path] | tuple[Path, ...],
    size: int,
    cache_dir: Path | None = None,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> CachedDataset:
    """`load_dataset` for each root (each one cached on its own), concatenated in order.

    Raises:
        ValueError: two roots share a folder name (the collection name must be unique).
    """
    roots = [roots] if isinstance(roots, (str, Path)) else list(roots)
    return concatenate([load_dataset(r, size, cache_dir, workers, progress) for r in roots])


def concatenate(parts: list[CachedDataset]) -> CachedDataset:
    """Several collections' data sets as one, in order.

    Raises:
        ValueError: two parts share a collection name.
    """
    names = [name for part in parts for name in part.roots]
    if len(set(names)) != len(names):
        raise ValueError(f"Data roots must have different folder names, got {names}.")
    if len(parts) == 1:
        return parts[0]
    return CachedDataset(
        {name: path for part in parts for name, path in part.roots.items()},
        np.concatenate([p.images for p in parts]),
        [x for p in parts for x in p.labels], [x for p in parts for x in p.sources],
        [x for p in parts for x in p.paths], np.concatenate([p.hashes for p in parts]),
        {k: v for p in parts for k, v in p.errors.items()},
        [x for p in parts for x in p.sequences], [x for p in parts for x in p.patients],
    )
