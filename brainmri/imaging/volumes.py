"""NIfTI volume bytes to axial 8-bit slices, windowed as the training slices were exported.

The volume is read from memory with nibabel (nothing written to disk). A gzip-compressed file is
inflated with a hard cap, and the header's declared size is checked against the limits before any
voxel is allocated, so a small file cannot claim gigabytes (a gzip bomb).

Axial slices are cut using the affine, never an assumed array layout: the volume is turned to the
closest canonical orientation (RAS+: nibabel's `as_closest_canonical`), so the third array axis
runs inferior to superior whatever the scanner stored. Each slice is shown as the exported
training slices are: anterior up, the patient's right on the image's left (radiological).

Windowing matches `../shared/data/brats/` (and the LGG exports): one window for the whole
volume, from the 0.5th to the 99.5th percentile of its foreground voxels (those above the volume's
minimum, which is the background of skull-stripped volumes), mapped to 0-255 and rounded. Each
slice is then an 8-bit grey image, the same as an exported slice uploaded on its own.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass

import numpy as np

from .errors import ImageError

__all__ = ["NIFTI_SUFFIXES", "Volume", "is_nifti", "read_nifti", "window_volume"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_GZIP_MAGIC = b"\x1f\x8b"
_HEADER_SIZES = {348: "nifti1", 540: "nifti2"}


@dataclass(frozen=True)
class Volume:
    """A volume's axial slices (inferior to superior), 8-bit, and where the axial axis came from."""

    slices: list[np.ndarray]  # each 2-D uint8, anterior up, patient's right on the left
    orientation: str  # the stored axis codes, e.g. "LAS" (from the affine)


def is_nifti(data: bytes, filename: str | None = None) -> bool:
    """True for a NIfTI-1/2 header (sniffed from the bytes, inflating a gzip's first block)."""
    head = data[:4]
    if data[:2] == _GZIP_MAGIC:
        try:
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[:4096], 4)
        except zlib.error:
            return False
    if len(head) < 4:
        return False
    return (int.from_bytes(head, "little") in _HEADER_SIZES
            or int.from_bytes(head, "big") in _HEADER_SIZES)


def _inflate(data: bytes, max_bytes: int) -> bytes:
    """Gunzip with a hard cap on the output (a gzip bomb stops at `max_bytes`)."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        raw = inflater.decompress(data, max_bytes + 1)
    except zlib.error as exc:
        raise ImageError("corrupt_image", "The NIfTI volume's gzip data is damaged.") from exc
    if len(raw) > max_bytes:
        raise ImageError("study_too_large",
                         f"The NIfTI volume inflates to more than {max_bytes:,} bytes, the limit "
                         "for one study (BRAINMRI_STUDY_MAX_BYTES).")
    return raw


def read_nifti(data: bytes, max_bytes: int, max_slices: int, max_pixels: int) -> Volume:
    """Read a NIfTI-1/2 volume from memory and cut it into windowed axial 8-bit slices.

    Args:
        data: the file's bytes (.nii or .nii.gz).
        max_bytes: the most the file may inflate to.
        max_slices: the most axial slices the volume may have.
        max_pixels: the most voxels the volume may have (all slices together).

    Raises:
        ImageError: damaged or unsupported file (`corrupt_image`, `unsupported_type`), or over a
            limit (`study_too_large`, `too_many_slices`); the message names the limit.
    """
    import nibabel as nib

    if data[:2] == _GZIP_MAGIC:
        data = _inflate(data, max_bytes)
    elif len(data) > max_bytes:
        raise ImageError("study_too_large", f"The NIfTI volume is larger than {max_bytes:,} "
                         "bytes, the limit for one study (BRAINMRI_STUDY_MAX_BYTES).")
    kind = _HEADER_SIZES.get(int.from_bytes(data[:4], "little")) or _HEADER_SIZES.get(
        int.from_bytes(data[:4], "big"))
    image_class = nib.Nifti2Image if kind == "nifti2" else nib.Nifti1Image
    try:
        header = image_class.header_class.from_fileobj(io.BytesIO(data))
        shape = tuple(int(n) for n in header.get_data_shape())
    except Exception as exc:  # nibabel raises several types for a malformed header
        raise ImageError("corrupt_image", "The NIfTI header is damaged.") from exc
    spatial = shape[:3]
    if len(shape) < 3 or any(n > 1 for n in shape[3:]) or min(spatial) < 1:
        raise ImageError("unsupported_type", "Only 3-D NIfTI volumes (one time point, one "
                         "channel) are accepted.")
    voxels = int(np.prod(spatial, dtype=np.int64))
    if voxels > max_pixels:
        raise ImageError("study_too_large", f"The NIfTI volume has {voxels:,} voxels; the limit "
                         f"for one study is {max_pixels:,} (BRAINMRI_STUDY_MAX_PIXELS).")
    if voxels * header.get_data_dtype().itemsize + int(header.get_data_offset()) > len(data):
        raise ImageError("corrupt_image", "The NIfTI volume is truncated: the file is shorter "
                         "than its header says.")
    try:
        image = image_class.from_bytes(data)
        orientation = "".join(nib.aff2axcodes(image.affine))
        canonical = nib.as_closest_canonical(image)
        volume = np.asarray(canonical.dataobj, dtype=np.float32).reshape(
            canonical.shape[:3])
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError("corrupt_image", "The NIfTI volume could not be read.") from exc
    if volume.shape[2] > max_slices:
        raise ImageError("too_many_slices", f"The volume has {volume.shape[2]} axial slices; the "
                         f"limit is {max_slices} (BRAINMRI_STUDY_MAX_SLICES).")
    if not np.isfinite(volume).all():
        raise ImageError("corrupt_image", "The NIfTI volume holds values that are not numbers.")
    windowed = window_volume(volume)
    # RAS+ array (x: left->right, y: posterior->anterior): rows = y reversed (anterior up),
    # columns = x reversed (patient's right on the image's left).
    slices = [np.ascontiguousarray(windowed[:, :, k].T[::-1, ::-1])
              for k in range(windowed.shape[2])]
    return Volume(slices, orientation)


def window_volume(volume: np.ndarray) -> np.ndarray:
    """One window for the whole volume: 0.5th-99.5th percentile of its foreground -> 0-255 uint8.

    The foreground is every voxel above the volume's minimum (the background of skull-stripped
    volumes and the air of clinical ones sit at it); a volume with no foreground comes out black,
    one with a single foreground value (a mask) black and white.
    """
    floor = float(volume.min())
    foreground = volume[volume > floor]
    if foreground.size == 0:
        return np.zeros(volume.shape, np.uint8)
    low, high = np.percentile(foreground, (0.5, 99.5))
    if high <= low:  # a label or mask volume: foreground white, background black
        return np.where(volume > floor, 255, 0).astype(np.uint8)
    scaled = np.clip((volume - low) / (high - low), 0.0, 1.0) * 255.0
    return np.rint(scaled).astype(np.uint8)
