"""Security properties: headers, no caching of results, uploads never touch the disk."""

from __future__ import annotations

import io
import os
import tempfile

import numpy as np
import pytest
from flask import request

from brainmri.web.security import CONTENT_SECURITY_POLICY
from brainmri.web.security import InMemoryRequest

from conftest import encode

EXPECTED_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def test_csp_has_no_inline_script():
    """The CSP allows scripts only from our origin and data:/blob: only for images."""
    assert "'unsafe-inline'" not in CONTENT_SECURITY_POLICY
    assert "default-src 'self'" in CONTENT_SECURITY_POLICY
    assert "img-src 'self' data: blob:" in CONTENT_SECURITY_POLICY
    assert "frame-ancestors 'none'" in CONTENT_SECURITY_POLICY


def _responses(client, pages, png_bytes):
    yield "GET /", client.get("/")
    yield "POST /predict", pages.upload(png_bytes)
    yield "POST /predict bad", pages.upload(b"text", "a.png")
    yield "POST /predict no token", client.post("/predict")
    yield "GET /healthz", client.get("/healthz")
    yield "GET /readyz", client.get("/readyz")
    yield "POST /api", client.post(
        "/api/v1/predict", data={"file": (io.BytesIO(png_bytes), "a.png")},
        content_type="multipart/form-data")
    yield "POST /api bad", client.post("/api/v1/predict")
    yield "GET 404", client.get("/missing")
    yield "GET /api 404", client.get("/api/missing")
    yield "GET static", client.get("/static/css/app.css")
    yield "GET favicon", client.get("/favicon.ico")
    yield "GET /metrics", client.get("/metrics")


def test_security_headers_on_every_response(client, pages, png_bytes):
    """Every response, errors and static files included, carries the security headers."""
    for name, response in _responses(client, pages, png_bytes):
        for header, value in EXPECTED_HEADERS.items():
            assert response.headers.get(header) == value, (name, header)
        assert "X-Request-ID" in response.headers, name
        response.close()


def test_results_are_not_cached(client, pages, png_bytes):
    """Pages and API answers carrying results (or errors about uploads) are no-store."""
    for name, response in _responses(client, pages, png_bytes):
        if name not in ("GET static", "GET favicon"):  # the same files for every visitor
            assert response.headers.get("Cache-Control") == "no-store", name
        else:
            assert "no-store" not in response.headers.get("Cache-Control", ""), name
        response.close()


def test_hsts_only_over_https(client):
    """HSTS is sent only when the request came over HTTPS."""
    assert "Strict-Transport-Security" not in client.get("/healthz").headers
    secure = client.get("/healthz", base_url="https://localhost")
    assert secure.headers["Strict-Transport-Security"].startswith("max-age=")


def test_session_cookie_flags(client):
    """The session cookie (which carries only the form nonce) is HttpOnly and SameSite=Lax."""
    cookie = client.get("/").headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie


def big_png() -> bytes:
    """A >1 MB PNG (random noise compresses badly), above Werkzeug's 500 KB spool limit."""
    rng = np.random.default_rng(0)
    data = encode(rng.integers(0, 256, (1100, 1100), dtype=np.uint8))
    assert len(data) > 1024 * 1024
    return data


def test_upload_never_written_to_temp_dir(client, pages):
    """A >1 MB upload leaves nothing behind in the temporary directory."""
    data = big_png()
    temp_dir = tempfile.gettempdir()
    before = set(os.listdir(temp_dir))
    api = client.post(
        "/api/v1/predict", data={"file": (io.BytesIO(data), "big.png")},
        content_type="multipart/form-data",
    )
    page = pages.upload(data, "big.png")
    assert api.status_code == 200 and page.status_code == 200
    assert set(os.listdir(temp_dir)) == before


def test_upload_is_kept_in_memory(app, monkeypatch):
    """Uploads are parsed into BytesIO; Werkzeug's spooling temp files are never created.

    A directory listing cannot see unlinked temp files (O_TMPFILE), so also forbid creating them.
    """
    assert app.request_class is InMemoryRequest

    def forbidden(*args, **kwargs):
        raise AssertionError("an upload was spooled to disk")

    monkeypatch.setattr("werkzeug.formparser.SpooledTemporaryFile", forbidden)
    monkeypatch.setattr("tempfile.SpooledTemporaryFile", forbidden)
    monkeypatch.setattr("tempfile.TemporaryFile", forbidden)
    monkeypatch.setattr("tempfile.NamedTemporaryFile", forbidden)
    data = big_png()
    with app.test_request_context(
        "/api/v1/predict", method="POST", data={"file": (io.BytesIO(data), "big.png")},
        content_type="multipart/form-data",
    ):
        stream = request.files["file"].stream
        assert isinstance(stream, io.BytesIO)
        assert stream.getvalue() == data
    response = app.test_client().post(
        "/api/v1/predict", data={"file": (io.BytesIO(data), "big.png")},
        content_type="multipart/form-data",
    )
    assert response.status_code == 200


@pytest.mark.parametrize("path", ["/", "/healthz", "/readyz", "/missing"])
def test_no_server_header_details(client, path):
    """Responses never mention the Python or library versions in the body."""
    body = client.get(path).get_data(as_text=True)
    assert "Werkzeug" not in body and "Traceback" not in body
