"""DICOM input: LUTs, windowing, MONOCHROME1, refusals, and no tag value ever leaking out."""

from __future__ import annotations

import csv
import io
import logging

import numpy as np
import pytest

from brainmri.imaging import ImageError
from brainmri.imaging import decode_image
from brainmri.imaging import load_scan
from brainmri.imaging import sniff_format

from conftest import PATIENT_STRINGS
from conftest import FakePredictor
from conftest import dicom_bytes
from conftest import encode
from conftest import synthetic_slice

JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"  # pydicom has no JPEG-LS decoder without plugins


def ramp(rows: int = 40, columns: int = 50, top: int = 4095) -> np.ndarray:
    """uint16 values 0..top spread over the image (every value of a 12-bit range hit)."""
    return np.linspace(0, top, rows * columns).round().astype(np.uint16).reshape(rows, columns)


def post_api(client, data: bytes, filename: str = "Doe_Jane.dcm"):
    form = {"file": (io.BytesIO(data), filename)}
    return client.post("/api/v1/predict", data=form, content_type="multipart/form-data")


def assert_no_tags(text: str) -> None:
    for value in PATIENT_STRINGS:
        assert value not in text, value


def test_sniffed_by_preamble_not_extension():
    """`DICM` at offset 128 makes a file DICOM, whatever its name or preamble says."""
    data = dicom_bytes(synthetic_slice())
    assert sniff_format(data) == "dicom"
    tiff_preamble = b"II*\x00" + data[4:]  # dual-personality files may start like a TIFF
    assert sniff_format(tiff_preamble) == "dicom"


def test_8_bit_monochrome2_is_the_stored_pixels():
    """No LUTs: the pixels come back unchanged, exactly as a PNG of them decodes."""
    pixels = synthetic_slice()
    decoded = decode_image(dicom_bytes(pixels))
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, decode_image(encode(pixels)))
    np.testing.assert_array_equal(load_scan(dicom_bytes(pixels), 32), load_scan(encode(pixels), 32))


def test_modality_lut_rescale_slope_and_intercept():
    """Stored values × RescaleSlope + RescaleIntercept, with nothing clipped."""
    stored = ramp()
    decoded = decode_image(dicom_bytes(stored, BitsStored=12, RescaleSlope=2, RescaleIntercept=-1024))
    np.testing.assert_allclose(decoded, stored * 2.0 - 1024.0)


def test_signed_pixels():
    """PixelRepresentation 1 (e.g. CT-like negative values) keeps its sign."""
    stored = (ramp().astype(np.int32) - 2048).astype(np.int16)
    np.testing.assert_array_equal(decode_image(dicom_bytes(stored)), stored.astype(np.float32))


def test_window_centre_width_after_rescale():
    """The VOI window (PS3.3 C.11.2.1.2 LINEAR) is applied to the rescaled values and clips."""
    stored = ramp()
    slope, intercept, centre, width = 2.0, -1000.0, 1000.0, 1001.0
    decoded = decode_image(dicom_bytes(
        stored, BitsStored=12, RescaleSlope=slope, RescaleIntercept=intercept,
        WindowCenter=centre, WindowWidth=width,
    ))
    y_min, y_max = 0 * slope + intercept, 4095 * slope + intercept  # output range after rescale
    x = stored * slope + intercept
    expected = ((x - (centre - 0.5)) / (width - 1) + 0.5) * (y_max - y_min) + y_min
    expected = np.clip(expected, y_min, y_max)
    np.testing.assert_allclose(decoded, expected, rtol=1e-6, atol=1e-3)
    assert decoded[x <= 499].max() == y_min and decoded[x >= 1500].min() == y_max


def test_invalid_window_falls_back_to_full_range():
    """A window width below 1 is invalid; the full (rescaled) range is used instead of failing."""
    stored = ramp()
    decoded = decode_image(dicom_bytes(stored, BitsStored=12, WindowCenter=100, WindowWidth=0))
    np.testing.assert_array_equal(decoded, stored.astype(np.float32))


def test_monochrome1_is_inverted():
    """MONOCHROME1 (0 = white) becomes bright-is-high, and then matches its MONOCHROME2 twin."""
    pixels = synthetic_slice()
    inverted = (255 - pixels).astype(np.uint8)
    decoded = decode_image(dicom_bytes(inverted, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(decoded, inverted.max() + inverted.min() - inverted.astype(np.float32))
    np.testing.assert_allclose(
        load_scan(dicom_bytes(inverted, photometric="MONOCHROME1"), 32),
        load_scan(dicom_bytes(pixels), 32), atol=1e-6,
    )


def test_rgb_secondary_capture_becomes_grey():
    """A colour DICOM is converted to grey like a colour PNG."""
    pixels = synthetic_slice()
    rgb = np.dstack([pixels] * 3)
    np.testing.assert_array_equal(decode_image(dicom_bytes(rgb, photometric="RGB")), pixels)


def test_pydicom_example_mr_and_its_rle_copy_agree():
    """pydicom's bundled MR slice decodes; the RLE-compressed copy (built-in decoder) matches."""
    from pydicom.data import get_testdata_file

    plain = decode_image(open(get_testdata_file("MR_small.dcm"), "rb").read())
    rle = decode_image(open(get_testdata_file("MR_small_RLE.dcm"), "rb").read())
    assert plain.shape == (64, 64)
    np.testing.assert_array_equal(plain, rle)


REFUSED = [
    pytest.param(lambda: dicom_bytes(synthetic_slice(), frames=3), "multi_frame",
                 "export the one slice", id="multi-frame"),
    pytest.param(lambda: dicom_bytes(synthetic_slice(), transfer_syntax=JPEG_LS_LOSSLESS),
                 "unsupported_type", "no decoder", id="compressed-without-decoder"),
    pytest.param(lambda: dicom_bytes(synthetic_slice())[:-2000], "corrupt_image", "damaged",
                 id="truncated"),
    pytest.param(lambda: dicom_bytes(np.dstack([synthetic_slice()] * 3), photometric="RGB",
                                     PhotometricInterpretation="PALETTE COLOR"),
                 "unsupported_type", "colour model", id="palette-colour"),
]


@pytest.mark.parametrize(("make", "code", "phrase"), REFUSED)
def test_refused_with_a_clear_message(make, code, phrase):
    """Multi-frame, undecodable compression and damage are refused before any pixel decoding."""
    with pytest.raises(ImageError) as caught:
        decode_image(make())
    assert caught.value.code == code
    assert phrase in caught.value.message
    assert_no_tags(caught.value.message)


def test_bundled_jpeg_ls_file_is_415(client):
    """A real compressed file for which no decoder is installed answers 415."""
    from pydicom.data import get_testdata_file

    data = open(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"), "rb").read()
    response = post_api(client, data)
    assert response.status_code == 415
    assert response.get_json()["error"]["code"] == "unsupported_type"


def test_non_image_object_is_refused():
    """A DICOM object without pixels (a structured report, a plan) is not an image."""
    from pydicom.data import get_testdata_file

    with pytest.raises(ImageError) as caught:
        decode_image(open(get_testdata_file("rtplan.dcm"), "rb").read())
    assert caught.value.code == "not_an_image"
    assert "holds no image" in caught.value.message


def test_pixel_limit_checked_from_the_header(monkeypatch):
    """Rows × Columns over the limit is refused before the pixel data is read."""
    data = dicom_bytes(ramp(100, 100))

    def forbidden(*args, **kwargs):
        raise AssertionError("pixels decoded")

    import pydicom.dataset

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(forbidden))
    with pytest.raises(ImageError) as caught:
        decode_image(data, max_pixels=5_000)
    assert caught.value.code == "image_too_large"


@pytest.mark.parametrize(
    ("make", "status"),
    [
        pytest.param(lambda: dicom_bytes(ramp(), BitsStored=12, RescaleSlope=2,
                                         RescaleIntercept=-1024, WindowCenter=2000,
                                         WindowWidth=3000), 200, id="ok"),
        pytest.param(lambda: dicom_bytes(synthetic_slice(), frames=2), 400, id="multi-frame"),
        pytest.param(lambda: dicom_bytes(synthetic_slice(), transfer_syntax=JPEG_LS_LOSSLESS),
                     415, id="compressed"),
        pytest.param(lambda: dicom_bytes(synthetic_slice())[:-1500], 400, id="truncated"),
    ],
)
def test_api_and_page_never_show_or_log_tags(client, pages, caplog, make, status):
    """No tag value reaches a JSON body, the result/error page, or any log line."""
    caplog.set_level(logging.DEBUG)
    data = make()
    response = post_api(client, data)
    assert response.status_code == status
    assert_no_tags(response.get_data(as_text=True))
    page = pages.upload(data, "scan.dcm")
    assert page.status_code == status
    assert_no_tags(page.get_data(as_text=True))
    assert_no_tags(caplog.text)
    assert_no_tags(" ".join(str(record.args) for record in caplog.records))
    if status == 200:
        assert "type=dicom" in caplog.text


def test_dcm_extension_accepted(client):
    """`.dcm` is on the allow-list of the page and the API."""
    assert post_api(client, dicom_bytes(synthetic_slice()), "IM0001.DCM").status_code == 200
    assert ".dcm" in client.get("/").get_data(as_text=True)


def test_cli_predict_folder_with_dicom(tmp_path, monkeypatch):
    """`brainmri predict` picks up .dcm files in folders, reports bad ones, and leaks no tag."""
    from click.testing import CliRunner

    from brainmri.cli import cli
    from brainmri.modelcard import CLASSES

    monkeypatch.setattr("brainmri.predictor.Predictor.from_path", lambda *a, **k: FakePredictor())
    folder = tmp_path / "series"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.dcm").write_bytes(dicom_bytes(synthetic_slice(seed=1)))
    (folder / "sub" / "b.png").write_bytes(encode(synthetic_slice(seed=2)))
    (folder / "volume.dcm").write_bytes(dicom_bytes(synthetic_slice(), frames=4))
    (folder / "jls.dcm").write_bytes(dicom_bytes(synthetic_slice(), transfer_syntax=JPEG_LS_LOSSLESS))
    (folder / "broken.dcm").write_bytes(dicom_bytes(synthetic_slice())[:300])
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    model = tmp_path / "model.h5"
    model.write_bytes(b"unused")
    out = tmp_path / "out.csv"
    result = CliRunner().invoke(cli, ["predict", str(folder), "--csv", str(out), "--model",
                                      str(model), "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert "2 classified, 3 unreadable" in result.output
    rows = {row["path"]: row for row in csv.DictReader(out.open())}
    assert len(rows) == 5
    assert rows[str(folder / "a.dcm")]["label"] == "glioma"
    assert rows[str(folder / "sub" / "b.png")]["label"] in CLASSES
    assert "several frames" in rows[str(folder / "volume.dcm")]["error"]
    assert "no decoder" in rows[str(folder / "jls.dcm")]["error"]
    assert rows[str(folder / "broken.dcm")]["error"]
    assert_no_tags(out.read_text() + result.output)
