"""Sagittal and coronal reformats of axial slice stacks: brain MRI in planes a collection lacks.

LGG holds axial slices only, yet users send sagittal and coronal slices too (SARTAJ has them).
Stacking a patient's numbered axial slices of one sequence into a volume and cutting it the other
two ways gives real brain MRI in those planes, of patients and contrasts the guard already
knows, so its refusals of them measure the plane alone. The slices are thick (the stack holds
20-88 of them), so the volume's height is set from the head itself (`HEIGHT_RATIO`) rather
than from a slice spacing the files do not carry.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

# `TCGA_<site>_<patient>_<date>_<slice>_<seq>.jpg`: one volume per case and sequence.
_NUMBERED_SLICE = re.compile(r"^(?P<case>.+)_(?P<slice>\d+)_(?P<sequence>[a-z0-9]+)\.[a-z]+$")
HEIGHT_RATIO = 0.85  # head height over head front-to-back length, about right for adults
POSITIONS = (0.3, 0.42, 0.5, 0.58, 0.7)  # where across the head each plane is cut
MIN_SLICES = 12  # a shorter stack covers too little of the head to cut across


@dataclass(frozen=True)
class Reformat:
    """One reformatted slice: where it came from and its 8-bit grey pixels."""

    case: str
    sequence: str
    plane: str  # "sagittal" or "coronal"
    position: float  # 0..1 across the head
    pixels: np.ndarray  # (side, side) uint8, head centred, top of the head up

    @property
    def name(self) -> str:
        """A file name that says what the slice is."""
        return f"{self.case}_{self.sequence}_{self.plane}_{round(self.position * 100)}.png"

    def png(self) -> bytes:
        """The slice as a PNG file, as a user would upload it."""
        ok, encoded = cv2.imencode(".png", self.pixels)
        if not ok:
            raise ValueError("PNG encoding failed")
        return encoded.tobytes()


def stacks(paths: list[Path]) -> dict[tuple[str, str], list[Path]]:
    """Group numbered axial slice files into volumes: (case, sequence) -> paths, bottom first.

    A stack with a gap in its numbering, or fewer than `MIN_SLICES` slices, is left out: cut
    across, a missing slice would show as a band.
    """
    found: dict[tuple[str, str], dict[int, Path]] = defaultdict(dict)
    for path in paths:
        match = _NUMBERED_SLICE.match(Path(path).name)
        if match:
            found[(match["case"], match["sequence"])][int(match["slice"])] = Path(path)
    volumes = {}
    for key, by_index in sorted(found.items()):
        indices = sorted(by_index)
        if len(indices) >= MIN_SLICES and indices == list(range(indices[0], indices[0] + len(indices))):
            volumes[key] = [by_index[i] for i in indices]
    return volumes


def reformat(volume: np.ndarray, plane: str, position: float) -> np.ndarray:
    """Cut a (slices, rows, columns) axial volume, slice 1 at the bottom, into one 8-bit slice.

    The cut is at `position` (0..1) across the head's own extent; the result is stretched so
    that the head is `HEIGHT_RATIO` times as tall as it is long, turned top up and padded to a
    square with black.
    """
    if plane not in ("sagittal", "coronal"):
        raise ValueError(f"plane must be sagittal or coronal, not {plane!r}")
    volume = volume.astype(np.float32)
    head = volume > 0.1 * np.percentile(volume, 99.5)
    if not head.any():
        raise ValueError("the volume holds no head")
    zs, ys, xs = (np.flatnonzero(head.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1)))
    length = ys[-1] - ys[0] + 1
    height = max(1, round(volume.shape[0] * HEIGHT_RATIO * length / (zs[-1] - zs[0] + 1)))
    lo, hi = (xs[0], xs[-1]) if plane == "sagittal" else (ys[0], ys[-1])
    at = int(lo + position * (hi - lo))
    cut = volume[:, :, at] if plane == "sagittal" else volume[:, at, :]
    cut = cv2.resize(cut, (cut.shape[1], height), interpolation=cv2.INTER_CUBIC)[::-1]
    side = max(cut.shape)
    square = np.zeros((side, side), np.float32)
    top, left = (side - cut.shape[0]) // 2, (side - cut.shape[1]) // 2
    square[top:top + cut.shape[0], left:left + cut.shape[1]] = cut
    return np.clip(np.rint(square), 0, 255).astype(np.uint8)


def reformats(paths: list[Path], positions: tuple[float, ...] = POSITIONS) -> list[Reformat]:
    """Sagittal and coronal reformats at `positions` of every volume the files make up."""
    out = []
    for (case, sequence), files in stacks(paths).items():
        slices = [cv2.imread(str(f), cv2.IMREAD_GRAYSCALE) for f in files]
        if any(s is None or s.shape != slices[0].shape for s in slices):
            continue  # unreadable or mismatched slices make no volume
        volume = np.stack(slices)
        for plane in ("sagittal", "coronal"):
            for position in positions:
                out.append(Reformat(case, sequence, plane, position,
                                    reformat(volume, plane, position)))
    return out
