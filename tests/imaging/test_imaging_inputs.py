"""Odd real-world images through the one shared preprocessing path (imaging.load_scan)."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from brainmri.imaging import ImageError
from brainmri.imaging import crop_to_head
from brainmri.imaging import decode_image
from brainmri.imaging import load_scan
from brainmri.imaging import preprocess
from brainmri.imaging import strip_frame

from conftest import encode
from conftest import synthetic_slice

SIZE = 64


def pil_bytes(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def asymmetric_slice(height: int = 120, width: int = 80) -> np.ndarray:
    """A head-like ellipse with a bright spot in its upper left, so rotations are visible."""
    image = np.zeros((height, width), np.uint8)
    cv2.ellipse(image, (width // 2, height // 2), (width * 2 // 5, height * 2 // 5), 0, 0, 360, 120, -1)
    cv2.circle(image, (width // 3, height // 4), 8, 250, -1)
    return image


def test_16_bit_png_is_scaled_not_clipped():
    """A 16-bit PNG keeps its full range; its model input matches the 8-bit original's."""
    pixels = synthetic_slice()
    wide = pixels.astype(np.uint16) * 257
    decoded = decode_image(encode(wide))
    assert decoded.max() == 255 * 257  # not clipped to 8 bits
    np.testing.assert_allclose(load_scan(encode(wide), SIZE), load_scan(encode(pixels), SIZE), atol=1e-5)


def test_16_bit_png_using_only_high_values():
    """Values far above 255 (a scanner's 12-bit range shifted up) still fill [0, 1]."""
    shifted = synthetic_slice().astype(np.uint16) * 16 + 40_000
    scan = load_scan(encode(shifted), SIZE)
    assert scan.min() == 0.0 and scan.max() == 1.0


def test_rgba_png_drops_alpha():
    """RGBA becomes grey; the alpha channel does not change the pixels."""
    pixels = synthetic_slice()
    rgba = cv2.cvtColor(pixels, cv2.COLOR_GRAY2BGRA)
    rgba[..., 3] = 128
    assert cv2.imdecode(np.frombuffer(encode(rgba), np.uint8), cv2.IMREAD_UNCHANGED).shape[2] == 4
    np.testing.assert_array_equal(load_scan(encode(rgba), SIZE), load_scan(encode(pixels), SIZE))


def test_palette_png():
    """A palette (indexed) PNG is expanded and converted to grey."""
    pixels = synthetic_slice()
    palette = Image.fromarray(pixels, "L").convert("P")
    data = pil_bytes(palette, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "P"
    np.testing.assert_array_equal(decode_image(data), pixels)


def test_colour_jpeg():
    """RGB JPEGs become grey."""
    pixels = synthetic_slice()
    scan = load_scan(encode(cv2.cvtColor(pixels, cv2.COLOR_GRAY2BGR), ".jpg"), SIZE)
    np.testing.assert_allclose(scan, load_scan(encode(pixels, ".jpg"), SIZE), atol=0.02)


@pytest.mark.parametrize(("orientation", "turn"), [(6, -1), (8, 1), (3, 2)])
def test_exif_orientation_is_applied(orientation, turn):
    """A phone JPEG stored sideways with an EXIF Orientation tag is turned upright."""
    upright = asymmetric_slice()
    stored = np.rot90(upright, k=-turn).copy()  # what the camera wrote to the file
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = pil_bytes(Image.fromarray(stored, "L"), "JPEG", exif=exif.tobytes(), quality=95)
    decoded = decode_image(data)
    assert decoded.shape == upright.shape
    assert np.abs(decoded - upright).mean() < 3


@pytest.mark.parametrize("shape", [(1, 1), (8, 8), (40, 63), (63, 20)])
def test_very_small_images(shape):
    """Images under 64 px are upscaled to the model's size without failing."""
    pixels = cv2.resize(synthetic_slice(), shape[::-1], interpolation=cv2.INTER_AREA)
    scan = load_scan(encode(pixels), 128)
    assert scan.shape == (128, 128, 1) and scan.dtype == np.float32
    assert np.isfinite(scan).all() and scan.min() >= 0 and scan.max() <= 1


def test_very_large_image_is_downscaled_within_the_limit():
    """A large export within the pixel limit is accepted and downscaled; above it, refused."""
    large = cv2.resize(synthetic_slice(), (2400, 2400), interpolation=cv2.INTER_NEAREST)
    data = encode(large)
    scan = load_scan(data, SIZE)
    assert scan.shape == (SIZE, SIZE, 1)
    assert np.abs(scan - load_scan(encode(synthetic_slice()), SIZE)).mean() < 0.03
    with pytest.raises(ImageError) as caught:
        load_scan(data, SIZE, max_pixels=2400 * 2400 - 1)
    assert caught.value.code == "image_too_large"


@pytest.mark.parametrize("level", [255, 200, 128])
def test_wide_bright_frame_is_stripped(level):
    """A screenshot's white or grey border (10% of the side) is removed before the head crop."""
    pixels = synthetic_slice(128)
    framed = cv2.copyMakeBorder(pixels, 14, 12, 16, 13, cv2.BORDER_CONSTANT, value=level)
    np.testing.assert_array_equal(strip_frame(framed.astype(np.float32)), pixels)
    np.testing.assert_array_equal(load_scan(encode(framed), SIZE), load_scan(encode(pixels), SIZE))


def test_wide_frame_survives_jpeg():
    """JPEG ringing along the frame's inner edge does not stop the frame from being found."""
    pixels = synthetic_slice(160)
    framed = cv2.copyMakeBorder(pixels, 20, 20, 20, 20, cv2.BORDER_CONSTANT, value=255)
    crop = crop_to_head(decode_image(encode(framed, ".jpg")))
    assert crop.shape[0] < 160  # the head, not the whole 200 px screenshot


@pytest.mark.parametrize("depth", [1, 3, 9])
def test_thin_frames_are_stripped(depth):
    """Preprocessing v2: a white frame of any depth (1-21 px in SARTAJ) is removed, on every
    edge or only one, so it neither defeats the head crop nor shows as a white line."""
    gray = synthetic_slice(200).astype(np.float32)
    thin = cv2.copyMakeBorder(gray, depth, depth, depth, depth, cv2.BORDER_CONSTANT, value=255)
    np.testing.assert_array_equal(strip_frame(thin), gray)
    one_side = cv2.copyMakeBorder(gray, 0, 0, depth, 0, cv2.BORDER_CONSTANT, value=255)
    np.testing.assert_array_equal(strip_frame(one_side), gray)
    model_input = preprocess(thin, 64)[..., 0]
    # No white line left on the border of what the model sees.
    assert max(model_input[0].min(), model_input[-1].min(), model_input[:, 0].min(),
               model_input[:, -1].min()) < 0.5
    np.testing.assert_allclose(model_input, preprocess(gray, 64)[..., 0], atol=0.02)


def test_black_padding_and_uniform_images_are_left_alone():
    """Dark padding is background, not a frame; a uniform image is not a frame around anything."""
    gray = synthetic_slice(200).astype(np.float32)
    padded = cv2.copyMakeBorder(gray, 40, 40, 40, 40, cv2.BORDER_CONSTANT, value=0)
    assert strip_frame(padded) is padded
    uniform = np.full((50, 50), 200, np.float32)
    assert strip_frame(uniform) is uniform


def test_annotations_around_the_head_are_cropped_away():
    """Burned-in text and a scale bar in the corners do not change what the model sees."""
    clean = np.zeros((300, 300), np.uint8)
    clean[60:240, 60:240] = synthetic_slice(180)
    annotated = clean.copy()
    cv2.putText(annotated, "L", (8, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.9, 255, 2)
    cv2.putText(annotated, "R 12mm", (200, 290), cv2.FONT_HERSHEY_SIMPLEX, 0.6, 255, 1)
    cv2.line(annotated, (8, 280), (50, 280), 255, 2)
    assert not np.array_equal(annotated, clean)
    np.testing.assert_array_equal(load_scan(encode(annotated), SIZE), load_scan(encode(clean), SIZE))


@pytest.mark.parametrize("length", [0xFBFFFF57, 0x7FFFFFFF, 0x80000000, 10_000])
def test_png_chunk_longer_than_the_file_is_refused_before_decoding(monkeypatch, length):
    """A chunk length past the end of the file (one flipped bit, found by a timing fuzz) is
    refused from the chunk headers: OpenCV spent up to 4.9 s on such 2 KB files."""
    import struct

    data = bytearray(encode(synthetic_slice(48)))
    assert data[37:41] == b"IDAT"
    data[33:37] = struct.pack(">I", length)

    def never(*_args, **_kwargs):
        raise AssertionError("the decoder must not be reached")

    monkeypatch.setattr(cv2, "imdecode", never)
    with pytest.raises(ImageError) as info:
        decode_image(bytes(data))
    assert info.value.code == "corrupt_image"


def test_png_with_many_chunks_and_trailing_bytes_still_decodes():
    """The chunk walk accepts what libpng accepts: ancillary chunks, and bytes after IEND."""
    import struct
    import zlib

    data = encode(synthetic_slice(48))
    text = b"tEXt" + b"Comment\x00" + b"x" * 100
    chunk = struct.pack(">I", len(text) - 4) + text + struct.pack(">I", zlib.crc32(text))
    with_text = data[:33] + chunk * 50 + data[33:] + b"trailing garbage"
    assert decode_image(with_text).shape == (48, 48)


def test_colourfulness_gives_numpys_value():
    """colourfulness reduces the channels with OpenCV: the same value as NumPy's, to rounding."""
    from brainmri.imaging.decode import colourfulness

    rng = np.random.default_rng(5)
    for shape in [(300, 517, 3), (64, 64, 3), (1000, 40, 3)]:
        bgr = rng.integers(0, 256, shape, dtype=np.uint8)
        small = bgr if max(shape[:2]) <= 256 else cv2.resize(
            bgr, None, fx=256 / max(shape[:2]), fy=256 / max(shape[:2]),
            interpolation=cv2.INTER_AREA)
        wide = small.astype(np.float64)
        reference = (wide.max(axis=2) - wide.min(axis=2)).mean() / 255.0
        assert colourfulness(bgr) == pytest.approx(reference, abs=1e-9)
    assert colourfulness(np.full((40, 40, 3), 7, np.uint8)) == 0.0


@pytest.mark.parametrize("shape", [(1, 600), (600, 1), (2, 5000)])
def test_a_thin_strip_is_prepared_not_crashed(shape):
    """A side that the head-finding thumbnail would shrink to nothing keeps one pixel (the
    HTTP fuzz test once found a 500 here: OpenCV refuses an empty size)."""
    strip = np.random.default_rng(0).random(shape).astype(np.float32) * 255
    out = preprocess(strip, 64)
    assert out.shape == (64, 64, 1) and np.isfinite(out).all()
