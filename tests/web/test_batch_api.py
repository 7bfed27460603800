"""POST /api/v1/predict/batch: several files, one result or error each, in order."""

from __future__ import annotations

import io
import logging

import pytest

from brainmri.inference import CLASSES
from brainmri.inference import DISCLAIMER

from conftest import FAKE_PROBABILITIES
from conftest import PATIENT_STRINGS
from conftest import bomb_png
from conftest import dicom_bytes
from conftest import encode
from conftest import synthetic_slice

URL = "/api/v1/predict/batch"


def post_batch(client, files: list[tuple[bytes, str]], field: str = "files"):
    form = {field: [(io.BytesIO(data), name) for data, name in files]}
    return client.post(URL, data=form, content_type="multipart/form-data")


def test_mixed_batch_keeps_order_and_reports_each_error(client, predictor, caplog):
    """Good files get predictions, bad ones an error; one bad file never fails the others."""
    caplog.set_level(logging.INFO, logger="brainmri")
    files = [
        (encode(synthetic_slice(seed=1)), "Doe_Jane_1.png"),
        (b"not an image at all", "Doe_Jane_2.png"),
        (dicom_bytes(synthetic_slice(seed=3)), "Doe_Jane_3.dcm"),
        (encode(synthetic_slice(seed=4)), "Doe_Jane_4.gif"),
        (bomb_png(), "Doe_Jane_5.png"),
        (dicom_bytes(synthetic_slice(), frames=2), "Doe_Jane_6.dcm"),
        (encode(synthetic_slice(seed=7), ".jpg"), "Doe_Jane_7"),
    ]
    response = post_batch(client, files)
    assert response.status_code == 200
    body = response.get_json()
    assert set(body) == {"results", "model", "disclaimer"}
    assert body["disclaimer"] == DISCLAIMER
    assert body["model"]["name"] == "fake-cnn"
    results = body["results"]
    assert [item["index"] for item in results] == list(range(len(files)))
    errors = {item["index"]: item["error"]["code"] for item in results if "error" in item}
    assert errors == {1: "not_an_image", 3: "unsupported_type", 4: "image_too_large",
                      5: "multi_frame"}
    for item in results:
        if "error" in item:
            assert set(item) == {"index", "error"} and item["error"]["message"]
        else:
            assert {"index", "label", "confidence", "probabilities",
                    "tumor_probability"} <= set(item)
            assert "disclaimer" not in item and "error" not in item  # disclaimer: top level
            assert item["probabilities"] == pytest.approx(FAKE_PROBABILITIES)
            assert sorted(item["probabilities"]) == sorted(CLASSES)
    assert predictor.calls == 3
    text = response.get_data(as_text=True) + caplog.text
    assert "Doe_Jane" not in text
    for value in PATIENT_STRINGS:
        assert value not in text
    assert "files=7 errors=4" in caplog.text


def test_limit_is_configurable(app, client):
    """More files than BRAINMRI_BATCH_MAX_FILES is a 413 with its own code."""
    app.config["BRAINMRI_BATCH_MAX_FILES"] = 3
    png = encode(synthetic_slice())
    assert post_batch(client, [(png, "a.png")] * 3).status_code == 200
    response = post_batch(client, [(png, "a.png")] * 4)
    assert response.status_code == 413
    assert response.get_json()["error"]["code"] == "too_many_files"
    assert "3" in response.get_json()["error"]["message"]


def test_default_limit_allows_16_files_despite_small_max_form_parts(app, client):
    """The batch raises the part limit for its own request only (MAX_FORM_PARTS stays small)."""
    assert app.config["MAX_FORM_PARTS"] <= 10
    png = encode(synthetic_slice(48))
    response = post_batch(client, [(png, f"{i}.png") for i in range(16)])
    assert response.status_code == 200
    assert len(response.get_json()["results"]) == 16
    assert post_batch(client, [(png, "x.png")] * 17).get_json()["error"]["code"] == "too_many_files"
    flood = post_batch(client, [(png, "x.png")] * 40)
    assert flood.status_code == 413


def test_no_files(client):
    """No `files` part: 400 missing_file (the single-file field name does not count)."""
    response = post_batch(client, [(encode(synthetic_slice()), "a.png")], field="file")
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "missing_file"


def test_empty_part_is_an_item_error(client):
    """An empty file is that item's error, not the request's."""
    response = post_batch(client, [(b"", ""), (encode(synthetic_slice()), "a.png")])
    assert response.status_code == 200
    first, second = response.get_json()["results"]
    assert first["error"]["code"] == "empty_file" and "label" in second


def test_batch_needs_no_form_token(app, client):
    """The API is exempt from the page's form token, batch included."""
    app.config["BRAINMRI_CSRF_ENABLED"] = True
    assert post_batch(client, [(encode(synthetic_slice()), "a.png")]).status_code == 200
