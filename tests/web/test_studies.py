"""Study view (issue 34): API, page, limits and refusals, with the fake predictor."""

from __future__ import annotations

import io
import logging
import re
import zipfile

import cv2
import numpy as np
import pytest

from brainmri.imaging import read_study
from brainmri.inference import DISCLAIMER
from conftest import PATIENT_STRINGS
from conftest import dicom_bytes
from conftest import encode
from conftest import synthetic_slice

NAME_TAG = "SMITH_JOHN_1970"  # stands for a patient tag in a filename: never echoed or logged


def nifti_bytes(volume: np.ndarray, affine: np.ndarray | None = None, gz: bool = False) -> bytes:
    """A NIfTI-1 file of `volume` built in memory (gzip-compressed with `gz`)."""
    import gzip

    import nibabel as nib

    image = nib.Nifti1Image(volume, np.eye(4) if affine is None else affine)
    data = image.to_bytes()
    return gzip.compress(data) if gz else data


def head_volume(depth: int = 12, side: int = 64) -> np.ndarray:
    """A synthetic head in RAS+ (x, y, z): an ellipsoid whose first and last slices are empty."""
    x, y, z = np.meshgrid(np.linspace(-1, 1, side), np.linspace(-1, 1, side),
                          np.linspace(-1, 1, depth), indexing="ij")
    volume = np.where(x**2 / 0.6 + y**2 / 0.8 + z**2 / 0.7 < 1, 400.0, 0.0)
    volume[side // 3 : side // 2, side // 2 : 2 * side // 3, :] *= 1.8  # something asymmetric
    return volume.astype(np.float32)


def slices_form(files: list[tuple[bytes, str]], **fields) -> dict:
    form = {"files": [(io.BytesIO(data), name) for data, name in files]}
    form.update(fields)
    return form


def post_study(client, files, **fields):
    return client.post("/api/v1/studies", data=slices_form(files, **fields),
                       content_type="multipart/form-data")


def zip_of(members: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def numbered_slices(count: int = 4) -> list[tuple[bytes, str]]:
    """Synthetic PNG slices named like an export (slice order in the names), plus a black one."""
    files = [(encode(synthetic_slice(96, seed)), f"{NAME_TAG}_{seed + 1}.png")
             for seed in range(count)]
    files.append((encode(np.zeros((96, 96), np.uint8)), f"{NAME_TAG}_{count + 1}.png"))
    return files


def test_api_slices_shape_order_and_blank(client):
    files = numbered_slices(10)
    response = post_study(client, list(reversed(files)))  # sent out of order
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["disclaimer"] == DISCLAIMER
    assert body["kind"] == "slices"
    assert [s["index"] for s in body["slices"]] == list(range(11))
    # _10 sorts after _9 (natural order), and the black slice (_11) is last: blank, not scored.
    assert body["slices"][-1]["blank"] is True and body["slices"][-1]["label"] is None
    assert body["slices"][0]["source"] == "file 11"  # sent last, first in the name order
    item = body["slices"][0]
    assert set(item) >= {"index", "source", "label", "probabilities", "tumor_probability",
                         "uncertain", "refused", "reason"}
    summary = body["summary"]
    assert set(summary) >= {"tumor_probability", "label", "most_suspicious", "rule"}
    assert summary["counts"] == {"slices": 11, "scored": 10, "blank": 1, "refused": 0,
                                 "uncertain": 0, "unreadable": 0}
    assert summary["label"] in ("tumor", "no_tumor")
    assert NAME_TAG not in response.get_data(as_text=True)


def test_each_slice_answer_is_the_single_upload_answer(client):
    files = numbered_slices(3)[:3]
    body = post_study(client, files).get_json()
    for (data, _), item in zip(files, body["slices"]):
        single = client.post("/api/v1/predict", data={"file": (io.BytesIO(data), "a.png")},
                             content_type="multipart/form-data").get_json()
        assert item["probabilities"] == single["probabilities"]
        assert item["uncertain"] == single["uncertain"]


def test_zip_gives_the_same_answers_as_the_slices(client):
    files = numbered_slices(4)
    plain = post_study(client, files).get_json()
    archive = zip_of({f"study/{name}": data for data, name in files})
    zipped = post_study(client, [(archive, "study.zip")]).get_json()
    assert zipped["kind"] == "zip"
    assert [s["probabilities"] for s in zipped["slices"]] == [s["probabilities"] for s in plain["slices"]]
    assert [s["blank"] for s in zipped["slices"]] == [s["blank"] for s in plain["slices"]]


@pytest.mark.parametrize("gz", [False, True])
def test_nifti_volume(client, gz):
    volume = head_volume()
    response = post_study(client, [(nifti_bytes(volume, gz=gz), "vol.nii.gz" if gz else "vol.nii")])
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["kind"] == "nifti"
    assert len(body["slices"]) == volume.shape[2]
    assert body["slices"][0]["source"] == "volume axial slice 0"
    assert body["slices"][0]["blank"] and body["slices"][-1]["blank"]
    assert not body["slices"][6]["blank"]


def test_nifti_slices_follow_the_affine_not_the_array_layout():
    """The same head stored LAS (x flipped in the array) gives the same axial slices as RAS."""
    volume = head_volume()
    ras = read_study([("a.nii", nifti_bytes(volume))], 32)
    las_affine = np.diag([-1.0, 1.0, 1.0, 1.0])
    las = read_study([("b.nii", nifti_bytes(volume[::-1].copy(), las_affine))], 32)
    # And a volume stored with its axes swapped (y, x, z), the affine saying so.
    swap_affine = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    swapped = read_study([("c.nii", nifti_bytes(volume.transpose(1, 0, 2).copy(), swap_affine))], 32)
    for other in (las, swapped):
        for a, b in zip(ras.slices, other.slices):
            assert a.blank == b.blank
            if a.scan is not None:
                np.testing.assert_array_equal(a.scan.model_input, b.scan.model_input)


def test_nifti_slice_is_exactly_its_exported_png():
    """A volume's slice reaches the network exactly as its 8-bit PNG export uploaded alone."""
    from brainmri.imaging import read_scan
    from brainmri.imaging.volumes import read_nifti

    data = nifti_bytes(head_volume())
    volume = read_nifti(data, 10**8, 100, 10**8)
    study = read_study([("v.nii", data)], 32)
    png = cv2.imencode(".png", volume.slices[6])[1].tobytes()
    np.testing.assert_array_equal(study.slices[6].scan.model_input, read_scan(png, 32).model_input)


def _series(positions, series_uids=None, instances=None):
    files = []
    for i, z in enumerate(positions):
        image = synthetic_slice(64, seed=i).astype(np.uint16) * 4
        extra = {"ImageOrientationPatient": [1, 0, 0, 0, 1, 0],
                 "ImagePositionPatient": [0, 0, z],
                 "SeriesInstanceUID": (series_uids or ["1.2.3"] * len(positions))[i]}
        if instances:
            extra["InstanceNumber"] = instances[i]
        files.append((dicom_bytes(image, **extra), f"{NAME_TAG}_{i}.dcm"))
    return files


def test_dicom_series_is_ordered_by_position(client):
    files = _series([30.0, 10.0, 20.0])
    body = post_study(client, files).get_json()
    assert body["kind"] == "dicom_series"
    # Ordered by position: 10 (file 2), 20 (file 3), 30 (file 1).
    assert [s["source"] for s in body["slices"]] == ["file 2", "file 3", "file 1"]
    text = post_study(client, files).get_data(as_text=True)
    assert not any(tag in text for tag in PATIENT_STRINGS)


def test_mixed_dicom_series_is_refused(client):
    files = _series([0.0, 5.0, 10.0], series_uids=["1.2.3", "1.2.3", "1.2.4"])
    response = post_study(client, files)
    assert response.status_code == 422
    error = response.get_json()["error"]
    assert error["code"] == "mixed_series"
    assert "2 different series" in error["message"]
    assert "1.2.4" not in error["message"]


def test_dicom_and_png_in_one_study_are_refused(client):
    files = _series([0.0]) + numbered_slices(1)[:1]
    response = post_study(client, files)
    assert response.status_code == 422
    assert response.get_json()["error"]["code"] == "mixed_study"


@pytest.mark.parametrize(("members", "words"), [
    ({"../evil.png": b"x"}, "outside"),
    ({"/etc/evil.png": b"x"}, "outside"),
    ({"notes.txt": b"hello"}, "not a PNG, JPEG or DICOM"),
    ({"inner.zip": b"PK\x03\x04"}, "another archive"),
])
def test_bad_archives_are_refused(client, members, words):
    response = post_study(client, [(zip_of(members), "study.zip")])
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == "bad_archive" and words in error["message"]


def test_zip_bomb_is_refused(client):
    bomb = zip_of({"slice.png": b"\0" * (20 * 1024 * 1024)})  # ~20 KB inflating to 20 MB
    assert len(bomb) < 100_000
    response = post_study(client, [(bomb, "study.zip")])
    assert response.status_code == 400
    assert "zip bomb" in response.get_json()["error"]["message"]


def test_zip_bomb_with_a_lying_header_is_refused():
    """A member whose declared size is small but whose data inflates far more still stops."""
    from brainmri.imaging import ImageError
    from brainmri.imaging import read_zip

    archive = bytearray(zip_of({"a.png": b"\0" * 5_000_000}))
    # Patch the declared uncompressed size (local header and central directory) to 1 KB.
    big = (5_000_000).to_bytes(4, "little")
    archive = archive.replace(big, (1024).to_bytes(4, "little"))
    with pytest.raises(ImageError) as info:
        read_zip(bytes(archive), 10, 10**9)
    assert info.value.code in ("bad_archive", "study_too_large")


def test_gzip_bomb_volume_is_refused(app, client):
    app.config["BRAINMRI_STUDY_MAX_BYTES"] = 2 * 1024 * 1024
    volume = np.zeros((256, 256, 64), np.float32)  # 16 MB of zeros, a few KB gzipped
    response = post_study(client, [(nifti_bytes(volume, gz=True), "v.nii.gz")])
    assert response.status_code == 413
    error = response.get_json()["error"]
    assert error["code"] == "study_too_large" and "BRAINMRI_STUDY_MAX_BYTES" in error["message"]


def test_too_many_slices_names_the_limit(app, client):
    app.config["BRAINMRI_STUDY_MAX_SLICES"] = 3
    response = post_study(client, numbered_slices(3))  # 4 files
    assert response.status_code == 413
    error = response.get_json()["error"]
    assert error["code"] == "too_many_slices" and "limit is 3" in error["message"]
    # Far more files than the part limit: still the slice limit's message, not a byte size.
    many = post_study(client, numbered_slices(3) * 10)
    assert many.status_code == 413
    assert many.get_json()["error"]["code"] == "too_many_slices"
    assert "3 slices" in many.get_json()["error"]["message"]


def test_too_many_pixels_names_the_limit(app, client):
    app.config["BRAINMRI_STUDY_MAX_PIXELS"] = 96 * 96 * 2
    response = post_study(client, numbered_slices(3))
    assert response.status_code == 413
    assert "BRAINMRI_STUDY_MAX_PIXELS" in response.get_json()["error"]["message"]


def test_study_bigger_than_the_single_upload_limit_fits(app, client):
    """A study may exceed the 20 MB single-upload limit (a typical series is 50-150 MB)."""
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024
    files = [(encode(synthetic_slice(160, seed), ".png"), f"s{seed}.png") for seed in range(6)]
    assert sum(len(d) for d, _ in files) > 64 * 1024
    assert post_study(client, files).status_code == 200


def test_study_over_its_byte_limit_names_it(app, client):
    app.config["BRAINMRI_STUDY_MAX_BYTES"] = 1000
    response = post_study(client, numbered_slices(3))
    assert response.status_code == 413
    assert "BRAINMRI_STUDY_MAX_BYTES" in response.get_json()["error"]["message"]


def test_batch_with_too_many_files_says_so(client):
    """40 small files to the batch endpoint: the file-count message, not '20 MB'."""
    files = [(io.BytesIO(encode(synthetic_slice(32, 0))), f"{i}.png") for i in range(40)]
    response = client.post("/api/v1/predict/batch", data={"files": files},
                           content_type="multipart/form-data")
    assert response.status_code == 413
    error = response.get_json()["error"]
    assert error["code"] == "too_many_files" and "16 files" in error["message"]


def test_unsupported_extension_is_refused(client):
    response = post_study(client, [(b"hello", "notes.txt")])
    assert response.status_code == 415


def test_missing_files_field(client):
    response = client.post("/api/v1/studies", data={}, content_type="multipart/form-data")
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "missing_file"


def test_refused_slices_are_reported_not_scored(client, predictor):
    predictor.refuse = ("colourfulness",)
    body = post_study(client, numbered_slices(2)).get_json()
    assert all(s["refused"] for s in body["slices"] if not s["blank"])
    assert body["summary"]["label"] == "no_answer"
    assert body["summary"]["tumor_probability"] is None


def test_page_form_and_result(client):
    form_page = client.get("/studies").get_data(as_text=True)
    assert 'type="file"' in form_page and "multiple" in form_page
    token = re.search(r'name="csrf_token" value="([^"]+)"', form_page).group(1)
    response = client.post("/studies", data=slices_form(numbered_slices(5), csrf_token=token),
                           content_type="multipart/form-data")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert DISCLAIMER in html
    assert html.index("result-disclaimer") < html.index("study-summary") < html.index("study-plot")
    assert "<svg" in html and 'role="img"' in html
    assert 'download="study.csv"' in html and "data:text/csv" in html
    assert 'href="#slice-' in html and 'id="slice-' in html
    assert "Blank, not scored" in html
    assert NAME_TAG not in html
    assert "<script" not in html.split("</main>")[0]


def test_page_needs_the_form_token(client):
    response = client.post("/studies", data=slices_form(numbered_slices(1)),
                           content_type="multipart/form-data")
    assert response.status_code == 400


def test_csv_has_every_slice_and_the_summary(client):
    from urllib.parse import unquote

    token = re.search(r'name="csrf_token" value="([^"]+)"',
                      client.get("/studies").get_data(as_text=True)).group(1)
    html = client.post("/studies", data=slices_form(numbered_slices(3), csrf_token=token),
                       content_type="multipart/form-data").get_data(as_text=True)
    uri = re.search(r'href="data:text/csv;charset=utf-8,([^"]+)"', html).group(1)
    rows = unquote(uri.replace("&amp;", "&")).strip().splitlines()
    assert rows[0].startswith("study,slice_index,source,label")
    assert len(rows) == 1 + 4 + 1  # header, 4 slices, summary


def test_metrics_count_studies_and_slices(client):
    post_study(client, numbered_slices(3))
    text = client.get("/metrics").get_data(as_text=True)
    assert re.search(r'brainmri_studies_total\{kind="slices",label="[a-z_]+",model="fake-cnn"\}', text)
    assert "brainmri_study_slices_bucket" in text
    assert 'brainmri_study_slice_states_total{model="fake-cnn",state="blank"}' in text


def test_filenames_never_logged(client, caplog):
    caplog.set_level(logging.INFO)
    post_study(client, numbered_slices(2))
    post_study(client, _series([0.0, 1.0], series_uids=["1", "2"]))
    assert "study request_id=" in caplog.text
    assert NAME_TAG not in caplog.text
    assert not any(tag in caplog.text for tag in PATIENT_STRINGS)


def test_folder_upload_clutter_is_dropped(client):
    files = numbered_slices(2) + [(b"\0\0junk", "study/.DS_Store"), (b"x", "Thumbs.db")]
    response = post_study(client, files)
    assert response.status_code == 200, response.get_json()
    assert len(response.get_json()["slices"]) == 3


def test_page_offers_a_folder_picker(client):
    html = client.get("/studies").get_data(as_text=True)
    assert "webkitdirectory" in html and 'id="study-folder"' in html


def test_zip_member_without_extension_that_is_not_an_image_is_refused(client):
    archive = zip_of({"slice1.png": numbered_slices(1)[0][0], "README": b"just text"})
    response = post_study(client, [(archive, "study.zip")])
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "bad_archive"


def test_zip_of_a_dicom_series_is_ordered_and_mixed_series_refused(client):
    files = _series([20.0, 10.0])
    archive = zip_of({f"IM{i}": data for i, (data, _) in enumerate(files)})
    body = post_study(client, [(archive, "s.zip")]).get_json()
    assert [s["source"] for s in body["slices"]] == ["ZIP file 2", "ZIP file 1"]
    mixed = _series([0.0, 1.0], series_uids=["1", "2"])
    archive = zip_of({f"IM{i}": data for i, (data, _) in enumerate(mixed)})
    assert post_study(client, [(archive, "s.zip")]).get_json()["error"]["code"] == "mixed_series"


def test_series_falls_back_to_instance_number():
    from brainmri.imaging.series import SeriesPosition
    from brainmri.imaging.series import order_series

    positions = [SeriesPosition("1", None, 3), SeriesPosition("1", None, 1),
                 SeriesPosition("1", None, 2)]
    assert order_series(positions) == [1, 2, 0]
    unknown = [SeriesPosition(None, None, None), SeriesPosition(None, 2.0, 1)]
    assert order_series(unknown) == [0, 1]  # not every file has a position or number: as sent


def test_page_study_bigger_than_the_single_upload_limit_fits(app, client):
    """The page's form token is read before the view; the study's own limits apply even so."""
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024
    token = re.search(r'name="csrf_token" value="([^"]+)"',
                      client.get("/studies").get_data(as_text=True)).group(1)
    files = [(encode(synthetic_slice(160, seed), ".png"), f"s{seed}.png") for seed in range(6)]
    response = client.post("/studies", data=slices_form(files, csrf_token=token),
                           content_type="multipart/form-data")
    assert response.status_code == 200
