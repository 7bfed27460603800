"""Fuzzing of the decode path: mutated PNG, JPEG and DICOM bytes give a model input or ImageError.

Seeds are small valid files built here; hypothesis applies bit flips, byte overwrites,
truncation, chunk insertion/duplication/deletion and header tweaks (huge or zero PNG IHDR and
JPEG SOF sizes, odd bit depths, DICOM Rows/Columns/BitsAllocated/...). Anything but ImageError
out of `load_scan`, or a 5xx from the API, is a bug; crashes found are kept in
tests/fixtures/fuzz_regressions/ and replayed by `test_regressions_*`. NumPy RuntimeWarnings
(overflow, NaN) count as failures too: they mean inf or NaN flowed through the preprocessing.

Runs are derandomized (same examples every run, no example database). The default count keeps
CI short; BRAINMRI_FUZZ_EXAMPLES=5000 runs a long fuzz, e.g.
``BRAINMRI_FUZZ_EXAMPLES=5000 uv run pytest tests/test_fuzz_decode.py -k direct``.
"""

from __future__ import annotations

import io
import os
import struct
import time
import zlib
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck
from hypothesis import event
from hypothesis import settings
from hypothesis import given
from hypothesis import strategies as st

from brainmri import create_app
from brainmri.imaging import ImageError
from brainmri.imaging import load_scan
from brainmri.web import EXTENSION_KEY
from conftest import FakePredictor
from conftest import dicom_bytes
from conftest import encode
from conftest import synthetic_slice

SIZE = 32
# The serving limit (FakePredictor.max_pixels), so headers that pass it really get decoded.
MAX_PIXELS = 8192 * 8192
# Per-example wall-clock bound: generous, it only catches hangs and runaway allocations.
HANG_SECONDS = float(os.environ.get("BRAINMRI_FUZZ_HANG_SECONDS", "10"))
# Per format; the defaults take about 20-30 s on two CPU cores.
EXAMPLES = int(os.environ.get("BRAINMRI_FUZZ_EXAMPLES", "500"))
HTTP_EXAMPLES = int(os.environ.get("BRAINMRI_FUZZ_HTTP_EXAMPLES", str(max(10, EXAMPLES // 3))))
REGRESSIONS = Path(__file__).parents[1] / "fixtures" / "fuzz_regressions"

pytestmark = [
    # pydicom warns about every oddity of a mutated file (excess frames, missing delimiters);
    # the property is about what comes out, and the noise would hide real warnings.
    pytest.mark.filterwarnings("ignore::UserWarning"),
    # NumPy overflow or NaN warnings mean inf/NaN flowed through the arithmetic: a bug too.
    pytest.mark.filterwarnings("error::RuntimeWarning"),
]

FUZZ_SETTINGS = settings(
    derandomize=True,
    database=None,
    deadline=None,  # the explicit HANG_SECONDS check instead: hypothesis deadlines are ms-scale
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _seeds() -> dict[str, bytes]:
    """Small valid files of every supported kind."""
    grey = synthetic_slice(48)
    wide = np.linspace(0, 65535, 40 * 48).astype(np.uint16).reshape(40, 48)
    ramp12 = np.linspace(0, 4095, 40 * 50).round().astype(np.uint16).reshape(40, 50)
    return {
        "jpeg": encode(cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR), ".jpg"),
        "jpeg_grey": encode(grey, ".jpg"),
        "png8": encode(grey),
        "png16": encode(wide),
        "dicom8": dicom_bytes(grey),
        "dicom16": dicom_bytes(
            ramp12, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=1000, WindowWidth=2000
        ),
        "dicom_mono1": dicom_bytes(ramp12, "MONOCHROME1"),
    }


SEEDS = _seeds()

# Values that break arithmetic: zero, one, sign and width boundaries, and "huge".
_INTERESTING_16 = [0, 1, 2, 3, 7, 8, 15, 16, 17, 255, 256, 0x7FFF, 0x8000, 0xFFFF]
# 4096 and 8192 pass the pixel limit in one dimension, so large allocations really happen.
_INTERESTING_32 = [*_INTERESTING_16, 4096, 8192, 8193, 100_000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]
# Decimal strings for the LUT and window elements: overflow, NaN, junk, multi-valued.
_INTERESTING_DS = [
    "0", "-0", "1e38", "-1e38", "3e38", "1e308", "-1e308", "nan", "inf", "-inf", "1e-45",
    "abc", "", "1\\2\\3", "65536",
]

# DICOM (group, element) tags worth tweaking, as explicit-VR little-endian US elements.
_DICOM_US_TAGS = [
    (0x0028, 0x0002),  # SamplesPerPixel
    (0x0028, 0x0010),  # Rows
    (0x0028, 0x0011),  # Columns
    (0x0028, 0x0100),  # BitsAllocated
    (0x0028, 0x0101),  # BitsStored
    (0x0028, 0x0102),  # HighBit
    (0x0028, 0x0103),  # PixelRepresentation
]


def _png_tweak(data: bytearray, field: int, value: int, fix_crc: bool) -> None:
    """Overwrite one IHDR field; optionally recompute its CRC so libpng looks past it."""
    if len(data) < 33 or data[12:16] != b"IHDR":
        return
    if field < 2:  # width, height: 4 bytes each
        offset = 16 + 4 * field
        data[offset : offset + 4] = struct.pack(">I", value & 0xFFFFFFFF)
    else:  # bit depth, colour type, compression, filter, interlace: one byte each
        data[24 + field - 2] = value & 0xFF
    if fix_crc:
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)


def _jpeg_tweak(data: bytearray, field: int, value: int) -> None:
    """Overwrite the precision, height, width or component count of the first SOF segment."""
    for marker in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc2"):
        pos = data.find(marker, 2)
        if pos >= 0 and pos + 10 <= len(data):
            break
    else:
        return
    if field == 0:
        data[pos + 4] = value & 0xFF
    elif field in (1, 2):
        offset = pos + 5 + 2 * (field - 1)
        data[offset : offset + 2] = struct.pack(">H", value & 0xFFFF)
    else:
        data[pos + 9] = value & 0xFF


def _dicom_tweak(data: bytearray, tag: int, value: int) -> None:
    """Overwrite the value of one US element (explicit VR little endian) if the file has it."""
    group, element = _DICOM_US_TAGS[tag % len(_DICOM_US_TAGS)]
    pos = data.find(struct.pack("<HH", group, element) + b"US\x02\x00")
    if pos >= 0:
        data[pos + 8 : pos + 10] = struct.pack("<H", value & 0xFFFF)


# WindowCenter, WindowWidth, RescaleIntercept, RescaleSlope (DS, 2-byte length).
_DICOM_DS_TAGS = [(0x0028, 0x1050), (0x0028, 0x1051), (0x0028, 0x1052), (0x0028, 0x1053)]


def _dicom_ds_tweak(data: bytearray, tag: int, value: str) -> None:
    """Replace the value of one DS element (explicit VR little endian), fixing its length."""
    group, element = _DICOM_DS_TAGS[tag % len(_DICOM_DS_TAGS)]
    pos = data.find(struct.pack("<HH", group, element) + b"DS")
    if pos < 0 or pos + 8 > len(data):
        return
    (length,) = struct.unpack("<H", data[pos + 6 : pos + 8])
    raw = value.encode("ascii")
    raw += b" " * (len(raw) % 2)  # DICOM values have even length
    data[pos + 6 : pos + 8 + length] = struct.pack("<H", len(raw)) + raw


def _dicom_pixel_length(data: bytearray, value: int) -> None:
    """Overwrite the declared length of PixelData (OW/OB with a 4-byte length)."""
    for vr in (b"OW", b"OB"):
        pos = data.rfind(struct.pack("<HH", 0x7FE0, 0x0010) + vr + b"\x00\x00")
        if pos >= 0:
            data[pos + 8 : pos + 12] = struct.pack("<I", value & 0xFFFFFFFF)
            return


_position = st.integers(min_value=0, max_value=2**31)
_small_bytes = st.binary(min_size=1, max_size=16)

_MUTATIONS = st.one_of(
    st.tuples(st.just("flip"), _position, st.integers(0, 7)),
    st.tuples(st.just("overwrite"), _position, _small_bytes),
    st.tuples(st.just("truncate"), _position),
    st.tuples(st.just("insert"), _position, _small_bytes),
    st.tuples(st.just("duplicate"), _position, st.integers(1, 512), _position),
    st.tuples(st.just("delete"), _position, st.integers(1, 256)),
    st.tuples(
        st.just("png"), st.integers(0, 6), st.sampled_from(_INTERESTING_32), st.booleans()
    ),
    st.tuples(st.just("jpeg"), st.integers(0, 3), st.sampled_from(_INTERESTING_16)),
    st.tuples(st.just("dicom"), st.integers(0, 6), st.sampled_from(_INTERESTING_16)),
    st.tuples(st.just("dicom_length"), st.sampled_from(_INTERESTING_32)),
    st.tuples(st.just("dicom_ds"), st.integers(0, 3), st.sampled_from(_INTERESTING_DS)),
)


def mutate(seed: bytes, mutations: list[tuple]) -> bytes:
    """Apply each mutation in turn; positions wrap around the current length."""
    data = bytearray(seed)
    for kind, *args in mutations:
        n = max(1, len(data))
        if kind == "flip":
            if data:
                data[args[0] % n] ^= 1 << args[1]
        elif kind == "overwrite":
            pos = args[0] % n
            data[pos : pos + len(args[1])] = args[1]
        elif kind == "truncate":
            del data[args[0] % n :]
        elif kind == "insert":
            pos = args[0] % (n + 1)
            data[pos:pos] = args[1]
        elif kind == "duplicate":
            start = args[0] % n
            chunk = bytes(data[start : start + args[1]])
            dest = args[2] % (n + 1)
            data[dest:dest] = chunk
        elif kind == "delete":
            start = args[0] % n
            del data[start : start + args[1]]
        elif kind == "png":
            _png_tweak(data, *args)
        elif kind == "jpeg":
            _jpeg_tweak(data, *args)
        elif kind == "dicom":
            _dicom_tweak(data, *args)
        elif kind == "dicom_length":
            _dicom_pixel_length(data, *args)
        elif kind == "dicom_ds":
            _dicom_ds_tweak(data, *args)
    return bytes(data)


mutation_lists = st.lists(_MUTATIONS, min_size=1, max_size=4)


def check_direct(data: bytes, note=lambda outcome: None) -> None:
    """The property: a (SIZE, SIZE, 1) float32 array of finite values in [0, 1], or ImageError.

    `note` receives the outcome (hypothesis's `event`, for --hypothesis-show-statistics).
    """
    start = time.perf_counter()
    try:
        image = load_scan(data, SIZE, max_pixels=MAX_PIXELS)
    except ImageError as error:
        assert error.code and error.message
        note(f"ImageError {error.code}")
    else:
        note("decoded")
        assert image.shape == (SIZE, SIZE, 1)
        assert image.dtype == np.float32
        assert np.isfinite(image).all()
        assert image.min() >= 0.0 and image.max() <= 1.0
    elapsed = time.perf_counter() - start
    assert elapsed < HANG_SECONDS, f"decoding took {elapsed:.1f} s"


@lru_cache(maxsize=1)
def _fuzz_client():
    """One app for every HTTP example: form token and rate limiting off, fake predictor."""
    app = create_app({
        "TESTING": True,
        "SECRET_KEY": "fuzz",
        "BRAINMRI_SKIP_MODEL": True,
        "BRAINMRI_CSRF_ENABLED": False,
        "BRAINMRI_RATE_LIMIT": None,
    })
    app.extensions[EXTENSION_KEY] = FakePredictor()
    return app.test_client()


def check_http(data: bytes) -> None:
    """The property through the API: 200 with probabilities, or a 4xx error in our JSON shape."""
    response = _fuzz_client().post(
        "/api/v1/predict", data={"file": (io.BytesIO(data), "scan")}
    )
    body = response.get_json()
    assert response.status_code == 200 or 400 <= response.status_code < 500, body
    if response.status_code == 200:
        assert set(body["probabilities"]) == set(FakePredictor().labels)
    else:
        assert set(body["error"]) == {"code", "message"}


def test_seeds_are_valid():
    """Every seed decodes, so mutations start from files that reach deep into the decoders."""
    for name, seed in SEEDS.items():
        assert load_scan(seed, SIZE).shape == (SIZE, SIZE, 1), name


@pytest.mark.parametrize("fmt", sorted(SEEDS))
@settings(FUZZ_SETTINGS, max_examples=EXAMPLES)
@given(mutations=mutation_lists)
def test_fuzz_direct(fmt, mutations):
    """load_scan on mutated bytes: a valid model input or ImageError, never another exception."""
    check_direct(mutate(SEEDS[fmt], mutations), note=event)


@pytest.mark.parametrize("fmt", sorted(SEEDS))
@settings(FUZZ_SETTINGS, max_examples=HTTP_EXAMPLES)
@given(mutations=mutation_lists)
def test_fuzz_http(fmt, mutations):
    """POST /api/v1/predict with mutated bytes: 200 or a 4xx JSON error, never 5xx."""
    check_http(mutate(SEEDS[fmt], mutations))


def _regressions() -> list[Path]:
    return sorted(REGRESSIONS.glob("*.bin")) if REGRESSIONS.is_dir() else []


@pytest.mark.parametrize("path", _regressions(), ids=lambda path: path.stem)
def test_regressions_direct(path):
    """Inputs that once crashed the decoder: now ImageError or a valid input."""
    check_direct(path.read_bytes())


@pytest.mark.parametrize("path", _regressions(), ids=lambda path: path.stem)
def test_regressions_http(path):
    """The same inputs through the API: a clean 4xx (or 200), never 500."""
    check_http(path.read_bytes())
