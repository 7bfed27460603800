"""The shipped model gives the same answer for the same pixels in JPEG, PNG, 16-bit PNG or DICOM.

Real MRI slices from the data set ($BRAINMRI_DATA, else ../shared/data/sartaj beside the checkout)
are decoded once and re-encoded in every supported container. Missing data skips with the
reason, except under CI=true, where it fails. No probability is hard-coded: the model may be
retrained, and only agreement between formats is asserted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from brainmri.config import DEFAULTS
from brainmri.imaging import decode_image

from conftest import dicom_bytes
from conftest import encode
from conftest import REAL_DATA
from conftest import require_real_data

pytestmark = [pytest.mark.slow, pytest.mark.realdata]

DATA = REAL_DATA
MODEL = Path(DEFAULTS["BRAINMRI_MODEL_DIR"]) / "brainmri_cnn.h5"  # the custom CNN's figures
TOLERANCE = 1e-3


def _one_jpeg_per_class() -> list[Path]:
    testing = DATA / "Testing"
    folders = sorted(p for p in testing.iterdir() if p.is_dir()) if testing.is_dir() else []
    picks = [next(iter(sorted(folder.glob("*.jpg"))), None) for folder in folders]
    picks = [p for p in picks if p is not None]
    if not picks:
        require_real_data()  # skips, or fails under CI=true, naming the missing folder
    return picks


def _containers(jpeg: bytes) -> dict[str, bytes]:
    """The JPEG's decoded pixels in every container the app takes."""
    pixels = decode_image(jpeg)
    assert pixels.min() >= 0 and pixels.max() <= 255 and np.array_equal(pixels, pixels.round())
    gray = pixels.astype(np.uint8)
    stored = gray.astype(np.uint16) * 200 + 1000  # 16-bit stored values, undone by the rescale
    slope, intercept = 0.5, -300.0
    y_min, y_max = intercept, 65535 * slope + intercept  # modality range of 16-bit unsigned
    return {
        "jpeg": jpeg,
        "png": encode(gray),
        "png16": encode(gray.astype(np.uint16) * 257),
        "dicom8": dicom_bytes(gray),
        "dicom16-rescale-window": dicom_bytes(
            stored, RescaleSlope=slope, RescaleIntercept=intercept,
            WindowCenter=(y_min + y_max) / 2 + 0.5, WindowWidth=y_max - y_min + 1,
        ),
        "dicom-monochrome1": dicom_bytes((255 - gray).astype(np.uint8), photometric="MONOCHROME1"),
    }


@pytest.fixture(scope="module")
def shipped():
    """The shipped model, loaded once."""
    from brainmri.inference import Predictor

    paths = _one_jpeg_per_class()
    predictor = Predictor.from_path(MODEL)
    predictor.load()
    return predictor, paths


def test_same_prediction_whatever_the_container(shipped):
    predictor, paths = shipped
    for path in paths:
        formats = _containers(path.read_bytes())
        inputs = {name: predictor.prepare(data) for name, data in formats.items()}
        np.testing.assert_array_equal(inputs["png"], inputs["jpeg"])
        np.testing.assert_array_equal(inputs["dicom8"], inputs["jpeg"])
        predictions = dict(zip(inputs, predictor.predict_batch(list(inputs.values()))))
        reference = predictions["jpeg"]
        for name, prediction in predictions.items():
            assert prediction.label == reference.label, (path.name, name)
            for label, probability in prediction.probabilities.items():
                assert probability == pytest.approx(reference.probabilities[label], abs=TOLERANCE), (
                    path.name, name, label)
