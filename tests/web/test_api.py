"""The JSON API: success, every kind of bad input, probes and error bodies."""

from __future__ import annotations

import io
import math

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from brainmri.inference import CLASSES
from brainmri.inference import ModelError
from brainmri.inference import DISCLAIMER
from brainmri.web import EXTENSION_KEY

from conftest import FAKE_PROBABILITIES
from conftest import bomb_png
from conftest import encode
from conftest import synthetic_slice

PATIENT_FILENAME = "Doe_Jane_MRN12345.png"
# The client fixture is safe to share across examples: each request is independent.
FIXTURES_OK = [HealthCheck.function_scoped_fixture]


def post_file(client, data: bytes, filename: str | None = PATIENT_FILENAME, field: str = "file"):
    """POST bytes as a multipart upload to the API."""
    form = {} if field is None else {field: (io.BytesIO(data), filename)}
    return client.post("/api/v1/predict", data=form, content_type="multipart/form-data")


def assert_error(response, status: int, code: str) -> None:
    """The standard JSON error body, with nothing leaked."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.is_json
    body = response.get_json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    text = response.get_data(as_text=True)
    assert "Traceback" not in text
    assert "Doe_Jane" not in text and "MRN12345" not in text
    assert "/" + "tmp" not in text and "brainmri/" not in text


def test_predict_png(client, png_bytes, predictor):
    """A valid PNG gets every class's probability, the model block and the disclaimer."""
    response = post_file(client, png_bytes)
    assert response.status_code == 200
    body = response.get_json()
    assert set(body) == {
        "label", "confidence", "probabilities", "tumor_probability", "model", "disclaimer",
        "uncertain",
    }
    assert body["uncertain"] is False  # 0.625 is above the configured 0.6
    assert body["label"] == "glioma"
    assert body["confidence"] == pytest.approx(0.625)
    assert list(body["probabilities"]) == sorted(CLASSES)  # JSON keys; every class present
    assert body["probabilities"] == pytest.approx(FAKE_PROBABILITIES)
    assert math.isclose(sum(body["probabilities"].values()), 1.0)
    assert body["tumor_probability"] == pytest.approx(1 - FAKE_PROBABILITIES["no_tumor"])
    assert body["model"] == {"name": "fake-cnn", "version": "0.0-test", "sha256": "0" * 64}
    assert body["disclaimer"] == DISCLAIMER
    assert PATIENT_FILENAME not in response.get_data(as_text=True)
    assert predictor.calls == 1


@pytest.mark.parametrize("filename", ["scan.jpg", "scan.JPEG", "scan", "scan.png"])
def test_predict_jpeg_and_extensions(client, jpeg_bytes, filename):
    """JPEG content is accepted with any allowed extension or none; content decides the type."""
    assert post_file(client, jpeg_bytes, filename).status_code == 200


def test_predict_16_bit_png(client):
    """16-bit grey PNGs (common for MRI exports) are accepted."""
    image = synthetic_slice().astype(np.uint16) * 256
    assert post_file(client, encode(image), "slice.png").status_code == 200


def truncated_jpeg() -> bytes:
    data = encode(cv2.cvtColor(synthetic_slice(256), cv2.COLOR_GRAY2BGR), ".jpg")
    return data[: len(data) // 2]


def gif_bytes() -> bytes:
    """A 1×1 GIF."""
    return (
        b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x01\x00"
        b"\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
    )


BAD_INPUTS = [
    pytest.param(b"", "scan.png", 400, "empty_file", id="empty-file"),
    pytest.param(b"hello, I am text\n" * 10, "notes.png", 400, "not_an_image", id="text-as-png"),
    pytest.param(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "report.png", 415,
                 "unsupported_type", id="pdf-as-png"),
    pytest.param(truncated_jpeg(), "scan.jpg", 400, "corrupt_image", id="truncated-jpeg"),
    pytest.param(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "scan.png", 400, "corrupt_image",
                 id="png-without-header"),
    pytest.param(gif_bytes(), "scan.gif", 415, "unsupported_type", id="gif"),
    pytest.param(gif_bytes(), "scan.png", 415, "unsupported_type", id="gif-as-png"),
    pytest.param(b"\x89PNG\r\n\x1a\n", "scan.exe", 415, "unsupported_type", id="wrong-extension"),
    pytest.param(b"\x89PNG\r\n\x1a\n", "scan.png.html", 415, "unsupported_type",
                 id="double-extension"),
    pytest.param(bomb_png(), "bomb.png", 413, "image_too_large", id="decompression-bomb"),
]


@pytest.mark.parametrize(("data", "filename", "status", "code"), BAD_INPUTS)
def test_bad_inputs(client, predictor, data, filename, status, code):
    """Every unusable upload is refused with a specific code and no leaked details."""
    assert_error(post_file(client, data, filename), status, code)
    assert predictor.calls == 0


def test_missing_field(client):
    """No `file` part at all."""
    assert_error(post_file(client, b"", field=None), 400, "missing_file")


def test_wrong_field_name(client, png_bytes):
    """The file sent under another name is a missing file, not a 500."""
    assert_error(post_file(client, png_bytes, field="image"), 400, "missing_file")


def test_empty_field(client):
    """An empty part with no filename is what a browser sends when no file was chosen."""
    assert_error(post_file(client, b"", filename=""), 400, "missing_file")


def test_not_multipart(client):
    """A JSON body is not an upload."""
    response = client.post("/api/v1/predict", json={"file": "x"})
    assert_error(response, 400, "missing_file")


def test_body_over_limit(app, client):
    """Bodies over MAX_CONTENT_LENGTH are refused with 413 before decoding."""
    app.config["MAX_CONTENT_LENGTH"] = 4096
    response = post_file(client, b"\x89PNG\r\n\x1a\n" + b"\x00" * 8192)
    assert_error(response, 413, "payload_too_large")
    assert "4 KB" in response.get_json()["error"]["message"]


def test_body_over_default_limit(client):
    """The 20 MB default limit holds."""
    response = post_file(client, b"\xff\xd8\xff" + b"\x00" * (20 * 1024 * 1024 + 1))
    assert_error(response, 413, "payload_too_large")
    assert "20 MB" in response.get_json()["error"]["message"]


def test_bomb_is_refused_before_decoding(client, monkeypatch):
    """A PNG claiming 100000×100000 pixels never reaches the decoder (no OOM)."""

    def forbidden(*args, **kwargs):
        raise AssertionError("decoder called")

    monkeypatch.setattr("brainmri.imaging.decode.cv2.imdecode", forbidden)
    assert_error(post_file(client, bomb_png(), "b.png"), 413, "image_too_large")


def test_too_many_parts(client, png_bytes):
    """Form part floods are refused (MAX_FORM_PARTS)."""
    form = {f"f{i}": "x" for i in range(20)}
    form["file"] = (io.BytesIO(png_bytes), "a.png")
    response = client.post("/api/v1/predict", data=form, content_type="multipart/form-data")
    assert_error(response, 413, "payload_too_large")


def test_unexpected_error_is_generic(client, png_bytes, predictor, monkeypatch, caplog):
    """A crash answers 500 with a generic message; the details only go to the log."""

    def boom(image):
        raise RuntimeError("secret detail /srv/models/x.h5")

    monkeypatch.setattr(predictor, "predict", boom)
    response = post_file(client, png_bytes)
    assert_error(response, 500, "internal_error")
    assert "secret detail" not in response.get_data(as_text=True)
    assert "secret detail" in caplog.text  # the traceback is logged server-side


def test_model_error_is_503(client, png_bytes, predictor, monkeypatch):
    """A model that fails to load answers 503 without its (path-bearing) message."""

    def broken(image):
        raise ModelError("/srv/model/brainmri_cnn.h5 could not be loaded")

    monkeypatch.setattr(predictor, "predict", broken)
    response = post_file(client, png_bytes)
    assert_error(response, 503, "model_unavailable")
    assert "/srv" not in response.get_data(as_text=True)


def test_no_model_configured_is_503(app, client, png_bytes):
    """An app built with BRAINMRI_SKIP_MODEL answers 503 for predictions."""
    del app.extensions[EXTENSION_KEY]
    assert_error(post_file(client, png_bytes), 503, "model_unavailable")
    assert client.get("/readyz").status_code == 503


def test_unknown_api_path_is_json(client):
    """404s under /api are JSON too."""
    assert_error(client.get("/api/v2/nothing"), 404, "not_found")


def test_wrong_method_is_json(client):
    """405 keeps the Allow header."""
    response = client.get("/api/v1/predict")
    assert_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]


def test_healthz(client):
    """Liveness needs no model."""
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_readyz(client, predictor):
    """503 before the model is loaded, 200 after."""
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_json() == {"status": "not_ready"}
    predictor.load()
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json()["status"] == "ready"
    assert response.get_json()["model"]["name"] == "fake-cnn"


def test_request_id_logged_without_filename(client, png_bytes, caplog):
    """The log line has id, size, type, label and latency, and never the filename."""
    caplog.set_level("INFO", logger="brainmri")
    response = post_file(client, png_bytes)
    request_id = response.headers["X-Request-ID"]
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("prediction"))
    assert f"request_id={request_id}" in line
    assert f"bytes={len(png_bytes)}" in line
    assert "type=png" in line and "label=glioma" in line and "latency_ms=" in line
    assert "Doe_Jane" not in caplog.text


def test_incoming_request_id_is_validated(client):
    """A proxy's X-Request-ID is reused only when it is a plain token."""
    plain = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert plain.headers["X-Request-ID"] == "abc-123"
    hostile = "x" * 65 + " status=200 label=no_tumor"
    echoed = client.get("/healthz", headers={"X-Request-ID": hostile}).headers["X-Request-ID"]
    assert echoed != hostile and " " not in echoed


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURES_OK)
@given(data=st.binary(max_size=2048), filename=st.sampled_from(["a.png", "a.jpg", "a", "a.txt"]))
def test_arbitrary_bytes_never_500(client, data, filename):
    """Whatever the bytes, the answer is a 2xx or a 4xx with the JSON error shape."""
    response = post_file(client, data, filename)
    assert response.status_code == 200 or 400 <= response.status_code < 500
    if response.status_code != 200:
        assert set(response.get_json()) == {"error"}


@settings(max_examples=30, deadline=None, suppress_health_check=FIXTURES_OK)
@given(cut=st.integers(min_value=1, max_value=4000))
def test_truncated_png_never_500(client, cut):
    """A valid PNG cut anywhere is refused cleanly (or, if still complete, accepted)."""
    data = encode(synthetic_slice(64, seed=1))
    response = post_file(client, data[: max(1, len(data) - cut)], "a.png")
    assert response.status_code in (200, 400)


def test_openapi_document_covers_api(app):
    """docs/openapi.yaml names every API route and every error code the API can send."""
    from brainmri.config import PROJECT_ROOT
    from brainmri.web.errors import IMAGE_ERROR_STATUS

    spec = (PROJECT_ROOT / "docs" / "openapi.yaml").read_text()
    for rule in app.url_map.iter_rules():
        if rule.endpoint.startswith("api."):
            assert f"  {rule.rule}:" in spec, rule.rule
    codes = [*IMAGE_ERROR_STATUS, "missing_file", "payload_too_large", "internal_error",
             "model_unavailable", "not_found", "method_not_allowed"]
    for code in codes:
        assert code in spec, code
