"""Order the files of one DICOM series by position, and refuse a set that mixes series.

Only three things are read from each header: the series it belongs to (SeriesInstanceUID,
compared for equality and never shown), where the slice lies (ImagePositionPatient projected on
the slice normal from ImageOrientationPatient) and InstanceNumber. Slices are ordered by
position when every file has one, else by instance number when every file has one, else left in
upload order. No tag value leaves this module, in a result or in a message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .dicom import _read
from .errors import ImageError

__all__ = ["SeriesPosition", "order_series", "series_position"]


@dataclass(frozen=True)
class SeriesPosition:
    """Where one DICOM file sits in its series (header only)."""

    series: str | None  # SeriesInstanceUID, for equality only
    position: float | None  # mm along the slice normal
    instance: int | None


def _floats(value, count: int) -> list[float] | None:
    try:
        numbers = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count and all(np.isfinite(numbers)) else None


def series_position(data: bytes) -> SeriesPosition:
    """Read a DICOM file's series, position along its normal and instance number (header only).

    Raises:
        ImageError: the file is not a readable DICOM (`corrupt_image`).
    """
    ds = _read(data, header_only=True)
    uid = ds.get("SeriesInstanceUID")
    origin = _floats(ds.get("ImagePositionPatient"), 3)
    axes = _floats(ds.get("ImageOrientationPatient"), 6)
    position = None
    if origin is not None and axes is not None:
        normal = np.cross(axes[:3], axes[3:])
        if np.linalg.norm(normal) > 0:
            position = float(np.dot(normal / np.linalg.norm(normal), origin))
    try:
        instance = int(ds.get("InstanceNumber")) if ds.get("InstanceNumber") is not None else None
    except (TypeError, ValueError):
        instance = None
    return SeriesPosition(str(uid) if uid else None, position, instance)


def order_series(positions: Sequence[SeriesPosition]) -> list[int]:
    """The files' order along the series: by position, else instance number, else as given.

    Raises:
        ImageError: `mixed_series`, the files belong to more than one series.
    """
    series = {p.series for p in positions if p.series is not None}
    if len(series) > 1:
        raise ImageError("mixed_series", f"The DICOM files come from {len(series)} different "
                         "series; a study takes one series at a time. Send each series on its own.")
    indices = list(range(len(positions)))
    if all(p.position is not None for p in positions):
        return sorted(indices, key=lambda i: (positions[i].position, i))
    if all(p.instance is not None for p in positions):
        return sorted(indices, key=lambda i: (positions[i].instance, i))
    return indices
