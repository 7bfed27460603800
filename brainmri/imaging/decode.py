"""Bytes to a grayscale array: sniff the type, check the header's limits, decode safely.

PNG and JPEG go to OpenCV after their headers are checked (declared size, truncation, chunk
lengths); DICOM goes to `dicom.decode_dicom`. No Flask, no TensorFlow, nothing written to disk.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import cv2
import numpy as np

from .dicom import decode_dicom
from .errors import ImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "SUPPORTED_FORMATS",
    "Decoded",
    "colourfulness",
    "decode_file",
    "decode_image",
    "image_dimensions",
    "peak_brightness",
    "sniff_format",
]

# Decoded images larger than this are refused before any pixel is allocated (decompression bombs).
# Clinical slices are 256²–1024²; 64 MP leaves room for screenshots and 16-bit scans.
DEFAULT_MAX_PIXELS = 8192 * 8192

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


@dataclass(frozen=True)
class Decoded:
    """One decode of a file: its grayscale pixels, how colourful and how bright its own pixels are."""

    grey: np.ndarray  # 2-D float32 in the file's value range, as `decode_image` returns it
    colourfulness: float  # `colourfulness` of the decoded pixels; 0 for grey files and DICOM
    peak_brightness: float | None = None  # `peak_brightness`; None where there is no full scale


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode PNG/JPEG/DICOM bytes into a 2-D float32 grayscale array in the file's value range.

    DICOM goes to `dicom.decode_dicom` (modality and VOI LUTs, MONOCHROME1 inverted);
    nothing but the pixels comes back from it.

    Raises:
        ImageError: empty, unknown, unsupported, truncated, corrupt or oversized input.
    """
    return _grey(_decode_pixels(data, max_pixels))


def decode_file(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Decode once: `decode_image`'s grayscale array and the colour measured on the same pixels.

    Raises:
        ImageError: as `decode_image`.
    """
    pixels = _decode_pixels(data, max_pixels)
    grey = _grey(pixels)
    return Decoded(grey, colourfulness(pixels), peak_brightness(pixels, grey))


def peak_brightness(pixels: np.ndarray, grey: np.ndarray | None = None) -> float | None:
    """The 99th percentile of an 8-bit file's grey pixels as a share of full brightness (255).

    An 8-bit PNG or JPEG is a display image: its exporter mapped the scan's range onto 0-255, so
    a slice whose brightest pixels stay near black shows no anatomy, however far preprocessing
    would stretch it (the first and last slices of a volume: noise). An 8-bit DICOM decodes to
    uint8 too and is judged the same way (`dicom._is_8_bit_display`). 16-bit files and other
    DICOM hold scanner units with no full scale, so they are not measured (None). `grey`: the
    same pixels as `_grey` gives them, when the caller has them already.
    """
    if pixels.dtype != np.uint8:
        return None
    grey = _grey(pixels) if grey is None else grey
    step = max(1, max(grey.shape) // 256)  # every pixel of a 256² slice, a quarter of a 512²
    return float(np.percentile(grey[::step, ::step], 99) / 255.0)


def colourfulness(pixels: np.ndarray, max_side: int = 256) -> float:
    """Mean chroma (max minus min channel, 0..1) of decoded BGR pixels; 0 for grey ones.

    Measured in 8 bits (a 16-bit PNG's high byte, what an 8-bit decode of the file keeps) on a
    copy shrunk to at most `max_side` pixels a side.
    """
    if pixels.ndim != 3:
        return 0.0
    if pixels.dtype == np.uint16:
        pixels = (pixels >> 8).astype(np.uint8)
    scale = max_side / max(pixels.shape[:2])
    if scale < 1:
        height, width = pixels.shape[:2]
        # A side that would shrink to nothing (a 1 × 600 strip) keeps one pixel.
        shrunk = (None if round(height * scale) >= 1 and round(width * scale) >= 1
                  else (max(1, round(width * scale)), max(1, round(height * scale))))
        pixels = cv2.resize(pixels, shrunk, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    # Per-pixel max and min over the channels with OpenCV, in 8 bits, summed as integers: the
    # same value as NumPy's max(axis=2) - min(axis=2) in float32 (to rounding), in a tenth of
    # the time (NumPy reduces a 3-long last axis slowly: 6 ms of a 14 ms upload).
    channels = cv2.split(np.ascontiguousarray(pixels))
    high, low = channels[0], channels[0]
    for channel in channels[1:]:
        high, low = cv2.max(high, channel), cv2.min(low, channel)
    chroma = cv2.subtract(high, low)
    return float(int(chroma.sum(dtype=np.uint64)) / (chroma.size * 255.0))


def _grey(pixels: np.ndarray) -> np.ndarray:
    """The decoded pixels as one float32 grayscale channel (colour converted, alpha gone)."""
    if pixels.ndim == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY)
    return pixels.astype(np.float32, copy=False)


def _decode_pixels(data: bytes, max_pixels: int) -> np.ndarray:
    """The file's pixels as decoded: 2-D grey, or BGR (alpha dropped); 8 or 16 bits, or DICOM's
    grey (uint8 or float32). Every check of `decode_image` happens here."""
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
    return image

