"""Bytes to model input: sniff the type, decode safely, crop to the head, resize and scale.

`load_scan` is the one preprocessing function that training, evaluation, batch prediction and
serving all call, so the network always sees pixels prepared the same way. Nothing here imports
Flask or TensorFlow, and nothing here writes to disk.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "PREPROCESSING",
    "ImageError",
    "HeadCrop",
    "apply_head_crop",
    "crop_to_head",
    "locate_head",
    "resize_mask",
    "decode_image",
    "image_dimensions",
    "load_scan",
    "preprocess",
    "sniff_format",
    "strip_frame",
    "to_uint8",
]

# Decoded images larger than this are refused before any pixel is allocated (decompression bombs).
# Clinical slices are 256²–1024²; 64 MP leaves room for screenshots and 16-bit scans.
DEFAULT_MAX_PIXELS = 8192 * 8192

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

_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"%PDF", "pdf"),
)
SUPPORTED_FORMATS = ("png", "jpeg", "dicom")

# DICOM Part 10 files: a 128-byte preamble (free content, even a TIFF header), then "DICM".
_DICOM_MAGIC_OFFSET = 128


class ImageError(ValueError):
    """An input that cannot become a model input; `message` is safe to show to a user.

    `code` is a stable machine-readable reason (`empty_file`, `not_an_image`,
    `unsupported_type`, `corrupt_image`, `image_too_large`, `multi_frame`); `errors.py` maps
    it to HTTP.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class _Dimensions:
    width: int
    height: int


def sniff_format(data: bytes) -> str | None:
    """Return the container format named by the magic bytes, or None if unknown."""
    # Checked first: the standard lets the preamble look like another format (dual-personality
    # DICOM/TIFF files).
    if data[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + 4] == b"DICM":
        return "dicom"
    for signature, name in _SIGNATURES:
        if data.startswith(signature):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def image_dimensions(data: bytes, fmt: str) -> tuple[int, int]:
    """Read (width, height) from a PNG or JPEG header without decoding any pixels.

    Raises:
        ImageError: when the header is missing or malformed.
    """
    if fmt == "png":
        # IHDR is always the first chunk: length(4) 'IHDR'(4) width(4) height(4).
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise ImageError("corrupt_image", "The PNG file is damaged (no image header).")
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    if fmt == "jpeg":
        dims = _jpeg_dimensions(data)
        if dims is None:
            raise ImageError("corrupt_image", "The JPEG file is damaged (no frame header).")
        return dims.width, dims.height
    raise ImageError("unsupported_type", f"Unsupported image type: {fmt}.")


def _jpeg_dimensions(data: bytes) -> _Dimensions | None:
    """Walk JPEG markers up to the first start-of-frame segment."""
    pos = 2
    size = len(data)
    while pos + 4 <= size:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if length < 2:
            return None
        # SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC) carry the frame size.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if pos + 9 > size:
                return None
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return _Dimensions(width, height)
        pos += 2 + length
    return None


PNG_MAX_CHUNK = 2**31 - 1  # the PNG specification's limit on a chunk's length


def _png_chunks_intact(data: bytes) -> bool:
    """True when every PNG chunk's declared length fits in the file, up to IEND.

    One flipped bit in a chunk length (say IDAT claiming 4 GB of a 2 KB file) made OpenCV spend
    seconds before giving up: a cheap way to burn a worker's CPU. Walking the chunk headers
    costs microseconds; CRCs are left to libpng.
    """
    pos, size = 8, len(data)
    while pos + 12 <= size:
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        if length > PNG_MAX_CHUNK or pos + 12 + length > size:
            return False
        if data[pos + 4 : pos + 8] == b"IEND":
            return True
        pos += 12 + length
    return False


def _is_truncated(data: bytes, fmt: str) -> bool:
    """True when the file ends before its end marker (libjpeg would pad it with grey)."""
    if fmt == "jpeg":
        return b"\xff\xd9" not in data[-1024:]
    if fmt == "png":
        return not _png_chunks_intact(data)
    return False


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode PNG/JPEG/DICOM bytes into a 2-D float32 grayscale array in the file's value range.

    DICOM goes to `brainmri.dicom.decode_dicom` (modality and VOI LUTs, MONOCHROME1 inverted);
    nothing but the pixels comes back from it.

    Raises:
        ImageError: empty, unknown, unsupported, truncated, corrupt or oversized input.
    """
    if not data:
        raise ImageError("empty_file", "The file is empty.")
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageError(
            "not_an_image",
            "The file is not an image. Upload a PNG, JPEG or DICOM brain MRI slice.",
        )
    if fmt not in SUPPORTED_FORMATS:
        raise ImageError(
            "unsupported_type",
            f"{fmt.upper()} files are not supported. Upload a PNG, JPEG or DICOM brain MRI "
            "slice.",
        )
    if fmt == "dicom":
        from .dicom import decode_dicom

        return decode_dicom(data, max_pixels)
    width, height = image_dimensions(data, fmt)
    if width == 0 or height == 0:
        raise ImageError("corrupt_image", "The image header declares zero width or height.")
    if width * height > max_pixels:
        raise ImageError(
            "image_too_large",
            f"The image is {width}×{height} pixels; the limit is {max_pixels:,} pixels.",
        )
    if _is_truncated(data, fmt):
        raise ImageError("corrupt_image", "The image file is truncated or damaged.")
    # ANYDEPTH keeps 16-bit PNGs; ANYCOLOR keeps gray as gray; both still apply EXIF orientation.
    try:
        image = cv2.imdecode(
            np.frombuffer(data, np.uint8), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR
        )
    except cv2.error as exc:  # libpng/libjpeg errors that OpenCV raises instead of returning None
        raise ImageError(
            "corrupt_image", "The image could not be decoded; it may be damaged."
        ) from exc
    if image is None or image.size == 0:
        raise ImageError("corrupt_image", "The image could not be decoded; it may be damaged.")
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    return image.astype(np.float32)


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
        thumb = cv2.resize(inner, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
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
