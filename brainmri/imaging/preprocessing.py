"""Decoded pixels to model input: strip a frame, crop to the head, pad, resize and scale.

`load_scan` (bytes -> `decode.decode_image` -> `preprocess`) is the one preprocessing function
that training, evaluation, batch prediction and serving all call, so the network always sees
pixels prepared the same way. Nothing here imports Flask or TensorFlow, and nothing here writes
to disk.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .decode import DEFAULT_MAX_PIXELS
from .decode import decode_file
from .decode import decode_image

__all__ = [
    "PREPROCESSING",
    "PREPROCESSING_VERSION",
    "HeadCrop",
    "Scan",
    "apply_head_crop",
    "crop_to_head",
    "locate_head",
    "resize_mask",
    "load_scan",
    "preprocess",
    "read_scan",
    "strip_frame",
    "to_uint8",
]

# Bumped whenever the pixels `preprocess` produces change, so caches and models can tell.
PREPROCESSING_VERSION = 2

# Travels in the model metadata so a reader knows what the network expects (timm's "cfg").
PREPROCESSING = {
    "function": "brainmri.imaging.load_scan",
    "version": PREPROCESSING_VERSION,
    "steps": [
        "decode PNG/JPEG (EXIF orientation applied, 16-bit kept) or single-frame DICOM "
        "(modality LUT, first VOI LUT/window, MONOCHROME1 inverted)",
        "convert to one grayscale channel (alpha dropped)",
        "strip a near-uniform, non-dark frame of any depth (screenshot borders, thin film frames)",
        "crop to the bounding box of the largest component above half the Otsu level (the head), 4% margin",
        "pad to a square with the background value",
        "resize with area interpolation to the model's input size",
        "scale intensities linearly: 0.5th percentile -> 0, 99.5th percentile -> 1, clipped",
    ],
}


def _at_least_one_pixel(array: np.ndarray, scale: float) -> tuple[int, int] | None:
    """None (let `fx`/`fy` decide, as every model was trained) unless `scale` would shrink a
    side to nothing (a 1 × 600 strip), then a size of at least one pixel a side."""
    height, width = array.shape[:2]
    if round(height * scale) >= 1 and round(width * scale) >= 1:
        return None
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_uint8(gray: np.ndarray) -> np.ndarray:
    """Map any-range grayscale to uint8 using its 0.5/99.5 percentiles (robust to outliers)."""
    low, high = np.percentile(gray, (0.5, 99.5))
    if high <= low:
        # Relative above 2**20: near 1e38 (a DICOM rescale) low + 1 == low, and 0 / 0 is NaN.
        high = low + max(1.0, abs(low) * 2.0**-20)
    return (np.clip((gray - low) / (high - low), 0.0, 1.0) * 255.0).astype(np.uint8)


def _frame_depth(
    lines_min: np.ndarray, lines_max: np.ndarray, floor: float, spread: float
) -> tuple[int, int]:
    """How many leading and trailing lines are frame lines (near-uniform and above `floor`)."""
    is_frame = (lines_min >= floor) & (lines_max - lines_min <= spread)
    if is_frame.all():
        return 0, 0  # a uniform image is not a frame around anything
    lead = int(np.argmin(is_frame))
    trail = int(np.argmin(is_frame[::-1]))
    return lead, trail


def _frame_box(gray: np.ndarray, level: float, tolerance: float,
               min_width: float) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of `gray` inside its frame (the whole image when there is none)."""
    height, width = gray.shape
    low, high = float(gray.min()), float(gray.max())
    span = high - low
    if span <= 0:
        return 0, height, 0, width
    floor, spread = low + level * span, tolerance * span
    top, bottom = _frame_depth(gray.min(axis=1), gray.max(axis=1), floor, spread)
    rows = gray[top : height - bottom]
    left, right = _frame_depth(rows.min(axis=0), rows.max(axis=0), floor, spread)
    if max(top, bottom) < min_width * height and max(left, right) < min_width * width:
        return 0, height, 0, width
    return top, height - bottom, left, width - right


def strip_frame(
    gray: np.ndarray, level: float = 0.25, tolerance: float = 0.06, min_width: float = 0.0
) -> np.ndarray:
    """Remove a near-uniform, non-dark frame around the image (screenshots, films).

    Left in place, such a frame becomes one ring-shaped bright component enclosing the whole
    image, and the head crop keeps everything. A frame line is a row or column whose values all
    lie at least `level` of the image's value range above its minimum and span at most
    `tolerance` of that range (room for JPEG ringing). Dark lines are never removed: black
    padding is background, and the head crop's margin may use it.

    Frames of any depth are removed by default (`min_width` 0). Preprocessing version 1 kept
    frames under 5 % of the side, because the first models had learned with them; those thin
    white lines then defeated the head crop and showed in "What the model saw". Version 2 strips
    them, and every shipped model was retrained on its inputs. Returns `gray` itself when nothing
    is removed.
    """
    y0, y1, x0, x1 = _frame_box(gray, level, tolerance, min_width)
    if (y0, x0) == (0, 0) and (y1, x1) == gray.shape:
        return gray
    return gray[y0:y1, x0:x1]


@dataclass(frozen=True)
class HeadCrop:
    """Where `crop_to_head` cuts an image: a box in its pixels, then padding to a square."""

    box: tuple[int, int, int, int]  # y0, y1, x0, x1 in the decoded image
    pad: tuple[int, int, int, int]  # top, bottom, left, right
    background: float  # the padding value


def locate_head(gray: np.ndarray, margin: float = 0.04) -> HeadCrop:
    """Find the head: the frame (`strip_frame`), then the largest bright component, 4 % margin.

    Falls back to the whole image (without its frame) when no plausible head is found (e.g. a
    uniform image). Kept apart from `crop_to_head` so a tumour mask can follow the same cut.
    """
    fy0, fy1, fx0, fx1 = _frame_box(gray, 0.25, 0.06, 0.0)
    inner = gray[fy0:fy1, fx0:fx1]
    y0, y1, x0, x1 = 0, inner.shape[0], 0, inner.shape[1]
    small_side = 256
    scale = min(1.0, small_side / max(inner.shape))
    thumb = inner
    if scale < 1:
        thumb = cv2.resize(inner, _at_least_one_pixel(inner, scale), fx=scale, fy=scale,
                           interpolation=cv2.INTER_AREA)
    thumb = cv2.GaussianBlur(to_uint8(thumb), (5, 5), 0)
    # Half of Otsu's level keeps dark brain tissue attached to the skull, so a bright tumor
    # is never mistaken for the whole head.
    otsu, _ = cv2.threshold(thumb, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    _, mask = cv2.threshold(thumb, max(otsu / 2, 8), 255, cv2.THRESH_BINARY)
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count > 1:
        areas = stats[1:, cv2.CC_STAT_AREA]
        best = 1 + int(np.argmax(areas))
        if areas[best - 1] >= 0.02 * thumb.size:
            x, y, w, h = (stats[best, k] for k in range(4))
            pad_x, pad_y = int(w * margin), int(h * margin)
            x0 = max(0, int((x - pad_x) / scale))
            y0 = max(0, int((y - pad_y) / scale))
            x1 = min(inner.shape[1], int(np.ceil((x + w + pad_x) / scale)))
            y1 = min(inner.shape[0], int(np.ceil((y + h + pad_y) / scale)))
    box = (fy0 + y0, fy0 + y1, fx0 + x0, fx0 + x1)
    height, width = y1 - y0, x1 - x0
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    pad = (top, side - height - top, left, side - width - left)
    background = 0.0
    if height != width:
        background = float(np.percentile(inner[y0:y1, x0:x1], 1))
    return HeadCrop(box, pad, background)


def apply_head_crop(array: np.ndarray, crop: HeadCrop, background: float | None = None) -> np.ndarray:
    """Cut `array` (the image, or a mask aligned with it) as `crop` says, padded to a square."""
    y0, y1, x0, x1 = crop.box
    cut = array[y0:y1, x0:x1]
    if not any(crop.pad):
        return cut
    value = crop.background if background is None else background
    top, bottom, left, right = crop.pad
    return cv2.copyMakeBorder(cut, top, bottom, left, right, cv2.BORDER_CONSTANT, value=value)


def crop_to_head(gray: np.ndarray, margin: float = 0.04) -> np.ndarray:
    """Crop to the largest bright connected component and pad it to a square.

    Frames (`strip_frame`), borders, black padding and small annotations around the head are
    removed, so slices framed differently look alike to the network.
    """
    return apply_head_crop(gray, locate_head(gray, margin))


def preprocess(gray: np.ndarray, size: int) -> np.ndarray:
    """Turn a decoded 2-D grayscale array into a (size, size, 1) float32 input in [0, 1]."""
    square = crop_to_head(gray.astype(np.float32, copy=False))
    interpolation = cv2.INTER_AREA if square.shape[0] >= size else cv2.INTER_CUBIC
    resized = cv2.resize(square, (size, size), interpolation=interpolation)
    low, high = np.percentile(resized, (0.5, 99.5))
    if high <= low:
        scaled = np.zeros_like(resized)
    else:
        scaled = np.clip((resized - low) / (high - low), 0.0, 1.0)
    return scaled.astype(np.float32)[..., None]


def resize_mask(mask: np.ndarray, image: np.ndarray, size: int) -> np.ndarray:
    """A (size, size) boolean mask aligned with `preprocess(image, size)`: same crop and resize."""
    square = apply_head_crop(mask.astype(np.float32), locate_head(image.astype(np.float32)), 0.0)
    return cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA) > 0.5 * square.max(initial=1)


def load_scan(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes and prepare them for the network: the shared preprocessing path.

    Args:
        data: the raw file bytes (PNG, JPEG or DICOM).
        size: the model's square input side in pixels.
        max_pixels: refuse images whose header declares more pixels than this.

    Returns:
        float32 array of shape (size, size, 1) with values in [0, 1].

    Raises:
        ImageError: the bytes are not a usable image.
    """
    return preprocess(decode_image(data, max_pixels=max_pixels), size)


@dataclass(frozen=True)
class Scan:
    """An upload decoded once: the network's input, and the colour and brightness of the file's
    own pixels (both for the guard)."""

    model_input: np.ndarray  # (size, size, 1) float32 in [0, 1], as `load_scan` returns it
    colourfulness: float  # `decode.colourfulness`, for the guard; 0 for grey files and DICOM
    peak_brightness: float | None = None  # `decode.peak_brightness`; None: no full scale


def read_scan(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Scan:
    """`load_scan`, with the colour and peak brightness measured on the same decode (the
    guard's colour and near-black checks).

    Raises:
        ImageError: the bytes are not a usable image.
    """
    decoded = decode_file(data, max_pixels=max_pixels)
    return Scan(preprocess(decoded.grey, size), decoded.colourfulness, decoded.peak_brightness)
