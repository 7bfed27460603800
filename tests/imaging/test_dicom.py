"""DICOM input: LUTs, windowing, MONOCHROME1, refusals, and no tag value ever leaking out."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

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

    plain = decode_image(Path(get_testdata_file("MR_small.dcm")).read_bytes())
    rle = decode_image(Path(get_testdata_file("MR_small_RLE.dcm")).read_bytes())
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

    data = Path(get_testdata_file("MR_small_jpeg_ls_lossless.dcm")).read_bytes()
    response = post_api(client, data)
    assert response.status_code == 415
    assert response.get_json()["error"]["code"] == "unsupported_type"


def test_non_image_object_is_refused():
    """A DICOM object without pixels (a structured report, a plan) is not an image."""
    from pydicom.data import get_testdata_file

    with pytest.raises(ImageError) as caught:
        decode_image(Path(get_testdata_file("rtplan.dcm")).read_bytes())
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
    from brainmri.inference import CLASSES

    monkeypatch.setattr("brainmri.inference.Predictor.from_path", lambda *a, **k: FakePredictor())
    folder = tmp_path / "series"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.dcm").write_bytes(dicom_bytes(synthetic_slice(seed=1)))
    (folder / "sub" / "b.png").write_bytes(encode(synthetic_slice(seed=2)))
    (folder / "volume.dcm").write_bytes(dicom_bytes(synthetic_slice(), frames=4))
    (folder / "jls.dcm").write_bytes(dicom_bytes(synthetic_slice(), transfer_syntax=JPEG_LS_LOSSLESS))
    (folder / "broken.dcm").write_bytes(dicom_bytes(synthetic_slice())[:300])
    (folder / "notes.txt").write_text("skipped: not an image suffix")
    (folder / "ct.dcm").write_bytes(dicom_bytes(synthetic_slice(), Modality="CT"))
    model = tmp_path / "model.h5"
    model.write_bytes(b"unused")
    out = tmp_path / "out.csv"
    result = CliRunner().invoke(cli, ["predict", str(folder), "--csv", str(out), "--model",
                                      str(model), "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert "Skipped 1 file that is not PNG, JPEG or DICOM: 1 .txt" in result.output
    assert "2 classified (0 uncertain), 1 refused, 3 unreadable, 1 skipped" in result.output
    with out.open(newline="", encoding="utf-8") as handle:
        rows = {row["path"]: row for row in csv.DictReader(handle)}
    assert len(rows) == 6
    ct = rows[str(folder / "ct.dcm")]
    assert ct["refused"] == "true" and ct["label"] == "" and ct["error"] == ""
    assert "CT (computed tomography)" in ct["reason"]
    assert rows[str(folder / "a.dcm")]["label"] == "glioma"
    assert rows[str(folder / "sub" / "b.png")]["label"] in CLASSES
    assert "several frames" in rows[str(folder / "volume.dcm")]["error"]
    assert "no decoder" in rows[str(folder / "jls.dcm")]["error"]
    assert rows[str(folder / "broken.dcm")]["error"]
    assert_no_tags(out.read_text() + result.output)


def without_modality(data: bytes) -> bytes:
    """The same DICOM file with its Modality element removed."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    del ds.Modality
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


CT_MESSAGE = ("This DICOM file is a CT (computed tomography) image; BrainMRI only reads MR "
              "brain slices.")

OTHER_MODALITIES = [
    ("CT", "a CT (computed tomography) image"),
    ("US", "a US (ultrasound) image"),
    ("CR", "a CR (computed radiography X-ray) image"),
    ("DX", "a DX (digital radiography X-ray) image"),
    ("MG", "an MG (mammography) image"),
    ("PT", "a PT (PET, positron emission tomography) image"),
    ("NM", "an NM (nuclear medicine) image"),
    ("XA", "an XA (X-ray angiography) image"),
    ("OT", "an OT (other modality) image"),
]


@pytest.mark.parametrize(("modality", "phrase"), OTHER_MODALITIES)
def test_other_modalities_are_refused_naming_the_modality(modality, phrase):
    """CT, X-ray, ultrasound, PET, ...: refused as `wrong_modality`, in plain words."""
    with pytest.raises(ImageError) as caught:
        decode_image(dicom_bytes(synthetic_slice(), Modality=modality))
    assert caught.value.code == "wrong_modality"
    expected = f"This DICOM file is {phrase}; BrainMRI only reads MR brain slices."
    assert caught.value.message == expected
    assert_no_tags(caught.value.message)


def test_ct_message_and_pydicoms_own_ct_slice():
    """The wording for CT, on a synthetic file and on pydicom's bundled CT slice."""
    from pydicom.data import get_testdata_file

    bundled = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    for data in (dicom_bytes(ramp(), Modality="CT"), bundled):
        with pytest.raises(ImageError) as caught:
            load_scan(data, 32)
        assert (caught.value.code, caught.value.message) == ("wrong_modality", CT_MESSAGE)


def test_unknown_modality_is_refused_without_echoing_the_header():
    """A code outside the table is still "not MR", and the header's text is never quoted."""
    with pytest.raises(ImageError) as caught:
        decode_image(dicom_bytes(synthetic_slice(), Modality="ZQX"))
    assert caught.value.code == "wrong_modality"
    assert "ZQX" not in caught.value.message
    assert "not an MR (magnetic resonance) image" in caught.value.message


def test_mr_and_missing_modality_go_on_to_the_image_checks():
    """MR decodes as before; no Modality (or an empty one) is treated like any image."""
    pixels = synthetic_slice()
    mr = dicom_bytes(pixels)
    missing = without_modality(mr)
    import pydicom

    assert "Modality" not in pydicom.dcmread(io.BytesIO(missing))
    for data in (mr, missing, dicom_bytes(pixels, Modality="")):
        np.testing.assert_array_equal(decode_image(data), pixels.astype(np.float32))
    # ... and the image checks still apply to them.
    with pytest.raises(ImageError) as caught:
        decode_image(without_modality(dicom_bytes(pixels, frames=2)))
    assert caught.value.code == "multi_frame"


def test_modality_is_read_from_the_header_before_any_pixel(monkeypatch):
    """The refusal comes before the pixel data is decoded and before the frame check."""
    import pydicom.dataset

    def forbidden(*args, **kwargs):
        raise AssertionError("pixels decoded")

    data = dicom_bytes(synthetic_slice(), frames=3, Modality="CT")
    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(forbidden))
    with pytest.raises(ImageError) as caught:
        decode_image(data)
    assert caught.value.code == "wrong_modality"


def test_api_and_page_refuse_another_modality_as_a_refusal(app, client, pages, caplog):
    """422 `wrong_modality` from the API and the page, like the guard's refusal; no tag leaks."""
    caplog.set_level(logging.DEBUG)
    app.config["BRAINMRI_CSRF_ENABLED"] = False
    cases = (("CT", "a CT (computed tomography) image"), ("US", "a US (ultrasound) image"))
    for modality, phrase in cases:
        data = dicom_bytes(synthetic_slice(), Modality=modality)
        response = post_api(client, data)
        assert response.status_code == 422
        body = response.get_json()
        assert body["error"]["code"] == "wrong_modality" and phrase in body["error"]["message"]
        assert "label" not in body and "probabilities" not in body
        page = pages.upload(data, "scan.dcm")
        assert page.status_code == 422
        html = page.get_data(as_text=True)
        assert phrase in html and "upload a slice from an MR series" in html
        assert 'data-code="wrong_modality"' in html and 'data-class="glioma"' not in html
        assert_no_tags(response.get_data(as_text=True) + html)
    assert_no_tags(caplog.text)


def test_api_classifies_mr_and_missing_modality(client):
    """MR and a file with no Modality are classified as before."""
    mr = dicom_bytes(synthetic_slice())
    for data in (mr, without_modality(mr)):
        response = post_api(client, data)
        assert response.status_code == 200
        assert response.get_json()["label"] == "glioma"


def test_batch_api_refuses_another_modality_per_file(client, predictor):
    """In a batch, the non-MR files get the refusal and the others their class."""
    mr = dicom_bytes(synthetic_slice(seed=1))
    files = [(mr, "a.dcm"), (dicom_bytes(synthetic_slice(), Modality="CT"), "b.dcm"),
             (without_modality(mr), "c.dcm"),
             (dicom_bytes(synthetic_slice(), Modality="US"), "d.dcm")]
    form = {"files": [(io.BytesIO(data), name) for data, name in files]}
    response = client.post("/api/v1/predict/batch", data=form, content_type="multipart/form-data")
    assert response.status_code == 200
    results = response.get_json()["results"]
    assert [item.get("label") for item in results] == ["glioma", None, "glioma", None]
    assert results[1]["error"] == {"code": "wrong_modality", "message": CT_MESSAGE}
    assert results[3]["error"]["code"] == "wrong_modality"
    assert "US (ultrasound)" in results[3]["error"]["message"]
    assert predictor.calls == 2
