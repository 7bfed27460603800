"""Several uploaded files to one study's ordered slices, each prepared as a single upload would be.

A study arrives as any one of:
- PNG/JPEG/DICOM slices (ordered by their names, natural order: `slice_2` before `slice_10`);
- a ZIP of them (`archives.py`);
- a DICOM series (`series.py`: ordered by position, else instance number; mixed series refused);
- a NIfTI volume (`volumes.py`: axial slices cut using the affine, windowed like the exports).

Each slice then takes the single upload's decode and preprocessing (`decode_file` and
`preprocess`, what `read_scan` does), so its model input, colour and peak brightness are the same
as if it had been uploaded alone; a volume's slice is exactly the 8-bit grey image an exported
PNG of it would decode to. Blank or near-blank slices (the ends of a volume) are marked and not
prepared. Filenames order the slices and never leave this module: a slice's `source` says where
it came from by position only.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field

import numpy as np

from .archives import is_zip
from .archives import read_zip
from .decode import decode_file
from .decode import peak_brightness
from .decode import SUPPORTED_FORMATS
from .decode import sniff_format
from .errors import ImageError
from .preprocessing import Scan
from .preprocessing import preprocess
from .series import order_series
from .series import series_position
from .volumes import is_nifti
from .volumes import read_nifti

__all__ = [
    "BLANK_AREA",
    "BLANK_RELATIVE_AREA",
    "PREPARE_THREADS",
    "StudyLimits",
    "StudySlice",
    "Study",
    "blank_flags",
    "read_study",
]

# A slice is blank when less than this share of it is foreground (absolute) ...
BLANK_AREA = 0.01
# ... or when its foreground is less than this share of the study's largest slice's foreground:
# the first and last slices of a volume, where little or no brain is cut. The exported training
# slices left out slices under 15% of their volume's largest brain area (brats/README.md); 10% is
# kept a little below, so a small slice with tumour in it is still scored.
BLANK_RELATIVE_AREA = 0.10
# Threads preparing a volume's slices (at most two: gunicorn runs several workers per machine).
PREPARE_THREADS = max(1, min(2, os.cpu_count() or 1))
# Foreground: pixels above this share of the study's bright level (the 99.5th percentile of all
# its pixels), so one threshold holds for the whole study, in whatever units it came.
_FOREGROUND_LEVEL = 0.10


@dataclass(frozen=True)
class StudyLimits:
    """What one study may hold; each refusal names the limit that tripped."""

    max_slices: int = 400
    max_bytes: int = 200 * 1024 * 1024
    max_pixels: int = 100_000_000  # all slices' decoded pixels (a volume's voxels) together


@dataclass
class StudySlice:
    """One slice of a study, in study order: its model input, or why it has none."""

    index: int  # 0-based position along the study
    source: str  # where it came from, by position only ("file 3", "volume axial slice 12")
    scan: Scan | None = None  # prepared as a single upload; None when blank or unusable
    error: ImageError | None = None  # the file's own decode error, if any
    blank: bool = False  # near-blank (no anatomy to speak of): reported, not scored
    kind: str = ""  # png, jpeg, dicom or nifti


@dataclass
class Study:
    """A study's slices in order, and what it was read from."""

    kind: str  # "slices", "zip", "dicom_series" or "nifti"
    slices: list[StudySlice] = field(default_factory=list)


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _too_many(count: int, limits: StudyLimits) -> ImageError:
    return ImageError("too_many_slices", f"The study has {count} slices; the limit is "
                      f"{limits.max_slices} slices a study (BRAINMRI_STUDY_MAX_SLICES).")


def read_study(files: Sequence[tuple[str | None, bytes]], size: int,
               limits: StudyLimits = StudyLimits()) -> Study:
    """Read uploaded files as one study and prepare every slice for the network.

    Args:
        files: (client filename or None, bytes) for each uploaded file, in upload order. The
            names only order slices and tell a volume from a slice; they are never returned.
        size: the model's square input side.
        limits: slices, bytes and pixels one study may hold.

    Raises:
        ImageError: the study as a whole cannot be read: `bad_archive`, `mixed_series`,
            `mixed_study`, `too_many_slices`, `study_too_large`, or a volume's own error. A
            single slice's decode error does not raise; it is that slice's `error`.
    """
    files = [(name or "", data) for name, data in files]
    if not files:
        raise ImageError("empty_file", "The study has no files.")
    if sum(len(data) for _, data in files) > limits.max_bytes:
        raise ImageError("study_too_large", f"The study is larger than {limits.max_bytes:,} "
                         "bytes, the limit (BRAINMRI_STUDY_MAX_BYTES).")
    volumes = [data for _, data in files if is_nifti(data)]
    archives = [data for _, data in files if is_zip(data)]
    if (volumes or archives) and len(files) > 1:
        raise ImageError("mixed_study", "Send one NIfTI volume, one ZIP archive or the slices "
                         "themselves, not several of them in one study.")
    if volumes:
        return _volume_study(volumes[0], size, limits)
    kind = "slices"
    if archives:
        members = read_zip(archives[0], limits.max_slices, limits.max_bytes)
        files = [(member.name, member.data) for member in members]
        kind = "zip"
    if len(files) > limits.max_slices:
        raise _too_many(len(files), limits)
    formats = [sniff_format(data) for _, data in files]
    if kind == "zip" and any(fmt not in SUPPORTED_FORMATS for fmt in formats):
        raise ImageError("bad_archive", "The ZIP archive holds a file that is not a PNG, JPEG or "
                         "DICOM slice; it was refused.")
    if any(fmt == "dicom" for fmt in formats):
        if any(fmt in ("png", "jpeg") for fmt in formats):
            raise ImageError("mixed_study", "The study mixes DICOM files with PNG/JPEG images; "
                             "send one kind at a time.")
        order = _dicom_order(files)
        kind = "dicom_series" if kind == "slices" else kind
    else:
        order = sorted(range(len(files)), key=lambda i: (_natural_key(files[i][0]), i))
    prefix = "ZIP file" if kind == "zip" else "file"
    slices: list[StudySlice] = []
    smalls: list[np.ndarray | None] = []
    budget = limits.max_pixels
    for position, original in enumerate(order):
        item = StudySlice(position, f"{prefix} {original + 1}", kind=formats[original] or "")
        small = None
        try:
            result = decode_file(files[original][1], max_pixels=max(1, budget))
        except ImageError as error:
            if error.code == "image_too_large":
                raise ImageError("study_too_large", "The study's slices hold more than "
                                 f"{limits.max_pixels:,} pixels together, the limit "
                                 "(BRAINMRI_STUDY_MAX_PIXELS).") from None
            item.error = error
        else:
            budget -= result.grey.size
            small = _small(result.grey)
            # Prepared now, so only one decoded slice is held at a time.
            item.scan = Scan(preprocess(result.grey, size), result.colourfulness,
                             result.peak_brightness)
        slices.append(item)
        smalls.append(small)
    for item, blank in zip(slices, blank_flags(smalls)):
        if blank:
            item.blank, item.scan = True, None
    return Study(kind, slices)


def _dicom_order(files: Sequence[tuple[str, bytes]]) -> list[int]:
    """The series order of DICOM files; a file whose header cannot be read keeps upload order."""
    positions = []
    for _, data in files:
        try:
            positions.append(series_position(data))
        except ImageError:
            positions.append(None)
    readable = [i for i, p in enumerate(positions) if p is not None]
    ordered = [readable[i] for i in order_series([positions[i] for i in readable])]
    return ordered + [i for i, p in enumerate(positions) if p is None]


def _volume_study(data: bytes, size: int, limits: StudyLimits) -> Study:
    volume = read_nifti(data, limits.max_bytes, limits.max_slices, limits.max_pixels)
    flags = blank_flags([_small(pixels) for pixels in volume.slices])
    slices = [StudySlice(index, f"volume axial slice {index}", kind="nifti", blank=blank)
              for index, blank in enumerate(flags)]
    scored = [item for item in slices if not item.blank]
    # OpenCV and NumPy's partition release the GIL, so two threads prepare two slices at once;
    # each slice's input is computed by the same function as alone, so the answers do not change.
    with ThreadPoolExecutor(max_workers=PREPARE_THREADS) as pool:
        scans = pool.map(lambda item: _volume_scan(volume.slices[item.index], size), scored)
        for item, scan in zip(scored, scans):
            item.scan = scan
    return Study("nifti", slices)


def _volume_scan(pixels: np.ndarray, size: int) -> Scan:
    """What `read_scan` gives for an 8-bit grey PNG of this slice: the same model input."""
    grey = pixels.astype(np.float32)
    return Scan(preprocess(grey, size), 0.0, peak_brightness(pixels, grey))


def _small(grey: np.ndarray) -> np.ndarray:
    """Every pixel of a 256-pixel slice, every other of a 512 one: enough to measure its area."""
    step = max(1, max(grey.shape) // 256)
    return np.asarray(grey[::step, ::step], np.float32)


def blank_flags(smalls: Sequence[np.ndarray | None]) -> list[bool]:
    """Which slices are blank or near-blank (`BLANK_AREA`, `BLANK_RELATIVE_AREA`).

    Foreground is measured against one level for the whole study: a tenth of the way from its
    darkest pixel to the 99.5th percentile of its pixels. None (a slice that failed to decode)
    is never called blank.
    """
    known = [small for small in smalls if small is not None]
    if not known:
        return [False] * len(smalls)
    floor = min(float(small.min()) for small in known)
    # One percentile over a sample of the whole study (every other pixel of each slice).
    sample = np.concatenate([small[::2, ::2].ravel() for small in known])
    bright = float(np.percentile(sample, 99.5))
    if bright <= floor:
        return [small is not None for small in smalls]
    threshold = floor + _FOREGROUND_LEVEL * (bright - floor)
    shares = [None if small is None else float(np.mean(small > threshold)) for small in smalls]
    largest = max(share for share in shares if share is not None)
    return [share is not None and (share < BLANK_AREA or share < BLANK_RELATIVE_AREA * largest)
            for share in shares]
