"""Shared fixtures: the app with a fake predictor (no TensorFlow), clients and test images."""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest
from flask import Flask
from werkzeug.serving import make_server

from brainmri import create_app
from brainmri.config import PROJECT_ROOT
from brainmri.imaging import Scan
from brainmri.imaging import load_scan
from brainmri.imaging import read_scan
from brainmri.inference import CLASSES
from brainmri.web import EXTENSION_KEY
from brainmri.inference import Explanation
from brainmri.inference import Prediction

# ONNX serving caches (inference/onnxengine.py) go to a folder of this test session's own, so
# a test never reads a cache left by the user's app and never writes into ~/.cache; gunicorn
# servers started by tests inherit it, so each test model is converted once per session.
_CACHE = Path(__import__("tempfile").mkdtemp(prefix="brainmri-test-onnx-"))
os.environ["BRAINMRI_CACHE_DIR"] = str(_CACHE)
__import__("atexit").register(shutil.rmtree, _CACHE, True)

# The real data set: $BRAINMRI_DATA, else ../shared/data/sartaj beside the checkout.
REAL_DATA = Path(os.environ.get("BRAINMRI_DATA", PROJECT_ROOT.parent / "shared" / "data" / "sartaj"))


def _missing_data(reason: str) -> None:
    """Skip with the reason, except under CI=true, where missing data fails the test."""
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def require_real_data() -> Path:
    """The real data set's folder; skip with the reason when it is missing, fail under CI=true."""
    if (REAL_DATA / "Testing").is_dir() and (REAL_DATA / "Training").is_dir():
        return REAL_DATA
    _missing_data(f"real MRI data set not found at {REAL_DATA} (set BRAINMRI_DATA to the sartaj folder)")


# The second collection: $BRAINMRI_LGG_DATA, else ../shared/data/lgg beside the checkout.
LGG_DATA = Path(os.environ.get("BRAINMRI_LGG_DATA", REAL_DATA.parent / "lgg"))


def require_lgg_data() -> Path:
    """The LGG collection's folder; skip with the reason when it is missing, fail under CI=true."""
    if (LGG_DATA / "slices.csv").is_file() and (LGG_DATA / "glioma").is_dir():
        return LGG_DATA
    _missing_data(f"LGG collection not found at {LGG_DATA} (set BRAINMRI_LGG_DATA to the lgg folder)")


# The third collection: $BRAINMRI_BRATS_DATA, else ../shared/data/brats beside the checkout.
BRATS_DATA = Path(os.environ.get("BRAINMRI_BRATS_DATA", REAL_DATA.parent / "brats"))


def require_brats_data() -> Path:
    """The BraTS collection's folder; skip with the reason when it is missing, fail under CI=true."""
    if (BRATS_DATA / "slices.csv").is_file() and (BRATS_DATA / "glioma").is_dir():
        return BRATS_DATA
    _missing_data(f"BraTS collection not found at {BRATS_DATA} "
                  "(set BRAINMRI_BRATS_DATA to the brats folder)")


FAKE_PROBABILITIES = {"glioma": 0.625, "meningioma": 0.2, "no_tumor": 0.125, "pituitary": 0.05}


class FakeCard:
    """The parts of ModelCard the web side reads."""

    name = "fake-cnn"
    version = "0.0-test"
    sha256 = "0" * 64
    classes = CLASSES
    input_size = 32
    channels = 1

    def __init__(self, name: str = "fake-cnn", raw: dict | None = None) -> None:
        self.name = name
        self.raw = raw or {"name": name, "arch": "cnn"}  # the metadata JSON

    @property
    def summary(self) -> dict[str, str]:
        """Name, version and sha256, as the API reports them."""
        return {"name": self.name, "version": self.version, "sha256": self.sha256}


class FakePredictor:
    """Same interface as Predictor with fixed softmax output; real preprocessing, no TensorFlow."""

    def __init__(self, probabilities: dict[str, float] | None = None, name: str = "fake-cnn",
                 raw: dict | None = None) -> None:
        self.card = FakeCard(name, raw)
        self.probabilities = probabilities or FAKE_PROBABILITIES
        self.max_pixels = 8192 * 8192
        self.loaded = False
        self.calls = 0

    @property
    def labels(self) -> tuple[str, ...]:
        """Class names in output order."""
        return self.card.classes

    @property
    def input_size(self) -> int:
        """Side of the square model input."""
        return self.card.input_size

    @property
    def ready(self) -> bool:
        """True once load() ran."""
        return self.loaded

    def load(self) -> None:
        """Pretend to load the model (idempotent)."""
        self.loaded = True

    def prepare(self, data: bytes) -> np.ndarray:
        """The real shared preprocessing."""
        return load_scan(data, self.input_size, max_pixels=self.max_pixels)

    def prepare_scan(self, data: bytes) -> Scan:
        """The real shared preprocessing, with the file's colour from the same decode."""
        return read_scan(data, self.input_size, max_pixels=self.max_pixels)

    def predict(self, image: np.ndarray) -> Prediction:
        """Fixed probabilities for a correctly shaped input."""
        assert image.shape == (self.input_size, self.input_size, 1)
        self.load()
        self.calls += 1
        return Prediction.from_probabilities(self.probabilities)

    def predict_batch(self, images) -> list[Prediction]:
        """Fixed probabilities for each correctly shaped input."""
        return [self.predict(image) for image in images]

    def predict_bytes(self, data: bytes) -> Prediction:
        """Decode, preprocess and classify."""
        return self.predict(self.prepare(data))

    # The trust layer (issue 5): no fitted threshold unless a test sets one; the guard refuses
    # only when a test sets `refuse` to a Verdict-like reason tuple (or overrides `reasons`).
    uncertain_below = None
    refuse: tuple[str, ...] = ()

    def reasons(self, image: np.ndarray, colourfulness: float | None) -> tuple[str, ...]:
        """The guard's reasons to refuse one input: `refuse` for every input (tests override)."""
        return tuple(self.refuse)

    def predict_checked(self, image: np.ndarray, colourfulness: float | None = None) -> Prediction:
        """Like predict, but refuse with NotBrainMRI when `reasons` names any."""
        result = self.predict_checked_batch([image], [colourfulness])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def predict_checked_batch(self, images, colourfulness=None, guard: bool = True,
                              peaks=None) -> list:
        """Per input a Prediction, or the NotBrainMRI refusal (returned) when the guard is on
        (`peaks`, the files' peak brightness, is accepted as the real one is, and not used)."""
        from brainmri.inference import NotBrainMRI
        from brainmri.inference import Verdict

        colours = list(colourfulness) if colourfulness is not None else [None] * len(images)
        results = []
        for image, colour in zip(images, colours):
            reasons = self.reasons(image, colour) if guard else ()
            results.append(NotBrainMRI(Verdict(True, reasons, {})) if reasons else self.predict(image))
        return results

    def explain(self, image: np.ndarray, label: str | None = None) -> Explanation:
        """A fixed heatmap of the input's shape: a bright square in the middle."""
        heatmap = np.zeros(image.shape[:2], np.float32)
        side = image.shape[0]
        heatmap[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = 1.0
        return Explanation(heatmap, label or max(self.probabilities, key=self.probabilities.get), "last_conv")


@pytest.fixture
def predictor() -> FakePredictor:
    """An unloaded fake predictor."""
    return FakePredictor()


@pytest.fixture
def app(predictor):
    """The app configured for tests, with the fake predictor installed."""
    # Rate limiting off: tests post many uploads from one address; test_ratelimit turns it on.
    app = create_app({
        "TESTING": True,
        "SECRET_KEY": "test-secret",
        "BRAINMRI_SKIP_MODEL": True,
        "BRAINMRI_RATE_LIMIT": None,
    })
    app.extensions[EXTENSION_KEY] = predictor
    return app


@pytest.fixture
def client(app):
    """A test client for the app."""
    return app.test_client()


class PageActions:
    """Drive the HTML upload form like a browser: fetch the page for its token, then post."""

    def __init__(self, client) -> None:
        self._client = client

    def token(self) -> str:
        """The form token from a freshly fetched upload page."""
        html = self._client.get("/").get_data(as_text=True)
        return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)

    def upload(self, data: bytes, filename: str = "scan.png", token: str | None = None,
               model: str | None = None):
        """POST the upload form with a file (and the model selector's choice, if given)."""
        form = {"file": (io.BytesIO(data), filename)}
        form["csrf_token"] = self.token() if token is None else token
        if model is not None:
            form["model"] = model
        return self._client.post("/predict", data=form, content_type="multipart/form-data")


@pytest.fixture
def pages(client) -> PageActions:
    """Helper for the HTML form."""
    return PageActions(client)


def synthetic_slice(size: int = 96, seed: int = 0) -> np.ndarray:
    """A uint8 grey image that looks vaguely like an axial slice: a bright ellipse on black."""
    rng = np.random.default_rng(seed)
    image = np.zeros((size, size), np.uint8)
    center = (size // 2, size // 2)
    cv2.ellipse(image, center, (size * 2 // 5, size // 3), 0, 0, 360, 160, -1)
    cv2.circle(image, (size // 2 + size // 8, size // 2), size // 10, 240, -1)
    noise = rng.integers(0, 20, image.shape, dtype=np.uint8)
    return cv2.add(image, noise)


def encode(image: np.ndarray, ext: str = ".png") -> bytes:
    """Encode an array with OpenCV."""
    ok, buf = cv2.imencode(ext, image)
    assert ok
    return buf.tobytes()


@pytest.fixture
def png_bytes() -> bytes:
    """A small valid grey PNG."""
    return encode(synthetic_slice())


@pytest.fixture
def jpeg_bytes() -> bytes:
    """A small valid colour JPEG."""
    return encode(cv2.cvtColor(synthetic_slice(), cv2.COLOR_GRAY2BGR), ".jpg")


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk with a correct CRC."""
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(
        ">I", zlib.crc32(kind + payload) & 0xFFFFFFFF
    )


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny, well-formed PNG whose header claims a huge image (a decompression bomb)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + png_chunk(b"IEND", b"")
    )


# Tag values written into every test DICOM; none may ever appear in a response, a log or a CSV.
PATIENT_TAGS = {
    "PatientName": "Doe^Jane^Q",
    "PatientID": "MRN-98765",
    "PatientBirthDate": "19700101",
    "InstitutionName": "St Example Hospital",
    "AccessionNumber": "ACC4242",
    "StudyDescription": "BRAIN W WO CONTRAST",
}
PATIENT_STRINGS = ("Doe", "Jane", "MRN-98765", "19700101", "St Example", "ACC4242", "BRAIN W WO")


def dicom_bytes(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    frames: int = 1,
    transfer_syntax: str | None = None,
    **attributes,
) -> bytes:
    """A DICOM Part 10 MR file (preamble + DICM) holding `pixels`, built in memory with pydicom.

    `pixels` is (rows, columns) or (rows, columns, 3); `frames` > 1 repeats it as a multi-frame
    object. Extra keyword arguments become attributes (RescaleSlope=..., WindowCenter=...).
    Every file carries PATIENT_TAGS.
    """
    from pydicom.dataset import Dataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian
    from pydicom.uid import MRImageStorage
    from pydicom.uid import generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    for keyword, value in PATIENT_TAGS.items():
        setattr(ds, keyword, value)
    data = np.stack([pixels] * frames) if frames > 1 else pixels
    ds.set_pixel_data(data, photometric, int(pixels.dtype.itemsize * 8))
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    if transfer_syntax is not None:
        from pydicom.encaps import encapsulate

        meta.TransferSyntaxUID = transfer_syntax
        ds.PixelData = encapsulate([b"\xff\xf7 not decodable here"])
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# Debian's `chromium` package; Playwright drives it and never downloads a browser of its own.
CHROMIUM = os.environ.get("BRAINMRI_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",  # CI containers run as root, where Chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def launch_chromium(playwright):
    """Start the system Chromium headless under Playwright."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


@contextmanager
def serve(app: Flask) -> Iterator[str]:
    """Serve `app` on a free port of 127.0.0.1 from a background thread; yields the base URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="live-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()


def require_redis_server() -> str:
    """Path of Debian's redis-server; skip with the reason when it is missing, fail under CI=true."""
    path = os.environ.get("BRAINMRI_REDIS_SERVER") or shutil.which("redis-server")
    if path:
        return path
    reason = "redis-server not installed (apt-get install redis-server); Redis rate-limit tests need it"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


class RedisServer:
    """A throwaway redis-server on a free loopback port: no persistence, always stopped."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The storage URI the app is given (FLASK_RATELIMIT_STORAGE_URI)."""
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self):
        """A redis-py client for inspecting the server."""
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def start(self, timeout: float = 15.0) -> None:
        """Start (or restart, on the same port) and wait until it answers PING."""
        # No RDB snapshots, no AOF: nothing is written, and a restart starts empty.
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--daemonize", "no",
             "--logfile", str(self.workdir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            try:
                if self.client().ping():
                    return
            except redis.RedisError:  # not listening yet, or still loading
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} in {timeout:.0f} s")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    """A running redis-server on loopback for one test, stopped afterwards."""
    server = RedisServer(require_redis_server(), tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
