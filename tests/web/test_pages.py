"""The HTML pages: upload form, result page, error pages and the form token."""

from __future__ import annotations

import base64
import io
import re

import cv2
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from brainmri.web.descriptions import CLASS_DESCRIPTIONS
from brainmri.inference import CLASSES
from brainmri.inference import DISCLAIMER
from brainmri.web.views import rounded_percentages

from conftest import PageActions
from conftest import bomb_png

PATIENT_FILENAME = "Smith_John_DOB1970-01-01.png"


def test_index(client):
    """The upload page: a plain file input, accepted types, size limit, every class, disclaimer."""
    response = client.get("/")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert 'id="drop-zone"' in html
    assert re.search(r'<input id="file-input" name="file" type="file"', html)
    assert 'enctype="multipart/form-data"' in html and 'action="/predict"' in html
    assert ".png" in html and ".jpg" in html and ".jpeg" in html
    assert "20 MB" in html
    for name in ("Glioma", "Meningioma", "No tumor", "Pituitary tumor"):
        assert name in html
    assert 'id="disclaimer"' in html and DISCLAIMER in html
    assert "<script>" not in html and " onclick=" not in html and "style=" not in html
    assert '<script src="/static/js/upload.js" defer></script>' in html


def test_result_page(pages, png_bytes):
    """The result shows the top class in words, a row per class, the summary and the disclaimer."""
    response = pages.upload(png_bytes, PATIENT_FILENAME)
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert re.search(r'id="result-label"[^>]*data-class="glioma"[^>]*>Glioma<', html)
    assert "62.5% confidence" in html
    for name in CLASSES:
        assert f'data-class="{name}"' in html
    rows = re.findall(
        r'<li class="prob-row[^"]*" data-class="(\w+)">.*?'
        r'<span class="prob-value">([\d.]+%)</span>',
        html, re.DOTALL,
    )
    assert rows == [("glioma", "62.5%"), ("meningioma", "20.0%"), ("no_tumor", "12.5%"),
                    ("pituitary", "5.0%")]
    assert "Any tumor" in html and "87.5%" in html
    assert html.count(DISCLAIMER) >= 2  # beside the result and in the footer
    assert 'id="disclaimer"' in html
    assert 'href="/"' in html and "Analyse another scan" in html
    assert "Smith_John" not in html and "DOB1970" not in html
    assert "style=" not in html


def test_result_preview_is_in_memory_png(pages, png_bytes):
    """The scan is shown back only as a PNG data URI of the model input."""
    html = pages.upload(png_bytes).get_data(as_text=True)
    match = re.search(
        r'<img id="scan-preview"[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html
    )
    assert match
    png = np.frombuffer(base64.b64decode(match.group(1)), np.uint8)
    image = cv2.imdecode(png, cv2.IMREAD_UNCHANGED)
    assert image.shape == (32, 32)
    assert "/static/uploads" not in html


def test_result_jpeg(pages, jpeg_bytes):
    """JPEG uploads work through the form too."""
    assert pages.upload(jpeg_bytes, "scan.jpeg").status_code == 200


@pytest.mark.parametrize(
    ("data", "filename", "status", "code"),
    [
        (b"", "scan.png", 400, "empty_file"),
        (b"just text", "scan.png", 400, "not_an_image"),
        (b"%PDF-1.4\n", "scan.png", 415, "unsupported_type"),
        (b"GIF89a....", "scan.gif", 415, "unsupported_type"),
        (bomb_png(), "scan.png", 413, "image_too_large"),
    ],
)
def test_error_page(pages, data, filename, status, code):
    """Bad uploads get the HTML error page with the message and what to do next."""
    response = pages.upload(data, filename)
    assert response.status_code == status
    assert response.mimetype == "text/html"
    html = response.get_data(as_text=True)
    assert re.search(rf'id="error-message"[^>]*data-code="{code}"', html)
    assert 'href="/"' in html  # a way back to the upload page
    assert DISCLAIMER in html
    assert "Traceback" not in html and filename not in html


def test_missing_file_page(client, pages):
    """Submitting the form with no file chosen."""
    response = client.post(
        "/predict", data={"csrf_token": pages.token(), "file": (io.BytesIO(b""), "")},
        content_type="multipart/form-data",
    )
    assert response.status_code == 400
    assert 'data-code="missing_file"' in response.get_data(as_text=True)


def test_body_too_large_page(app, pages):
    """413 on the page is HTML."""
    token = pages.token()
    app.config["MAX_CONTENT_LENGTH"] = 1024
    response = pages.upload(b"\x89PNG" + b"\x00" * 4096, token=token)
    assert response.status_code == 413
    assert response.mimetype == "text/html"
    assert "1 KB" in response.get_data(as_text=True)


def test_404_page(client):
    """Unknown pages render the error template with the disclaimer."""
    response = client.get("/no/such/page")
    assert response.status_code == 404
    html = response.get_data(as_text=True)
    assert 'data-code="not_found"' in html and DISCLAIMER in html


def test_500_page_is_generic(pages, png_bytes, predictor, monkeypatch):
    """A crash shows a generic page with the request id, never the exception text."""

    def boom(image):
        raise ValueError("/home/user/secret.h5 exploded")

    monkeypatch.setattr(predictor, "predict", boom)
    response = pages.upload(png_bytes)
    assert response.status_code == 500
    html = response.get_data(as_text=True)
    assert "exploded" not in html and "secret" not in html and "Traceback" not in html
    assert response.headers["X-Request-ID"] in html


@pytest.mark.parametrize("token", ["", "forged", None])
def test_form_token_required(client, png_bytes, token):
    """The form POST needs a valid token from this session."""
    form = {"file": (io.BytesIO(png_bytes), "scan.png")}
    if token is not None:
        form["csrf_token"] = token
    response = client.post("/predict", data=form, content_type="multipart/form-data")
    assert response.status_code == 400
    assert 'data-code="invalid_form_token"' in response.get_data(as_text=True)


def test_form_token_from_another_session(app, png_bytes):
    """A token fetched by an attacker in their own session does not work in the victim's."""
    attacker, victim = app.test_client(), app.test_client()
    token = PageActions(attacker).token()
    victim.get("/")
    response = victim.post(
        "/predict", data={"csrf_token": token, "file": (io.BytesIO(png_bytes), "scan.png")},
        content_type="multipart/form-data",
    )
    assert response.status_code == 400


def test_form_token_expires(app, pages, png_bytes):
    """Old tokens are refused."""
    token = pages.token()
    app.config["BRAINMRI_CSRF_TIME_LIMIT"] = -1
    assert pages.upload(png_bytes, token=token).status_code == 400


def test_form_token_can_be_disabled(app, client, png_bytes):
    """BRAINMRI_CSRF_ENABLED=false turns the check off (never in production)."""
    app.config["BRAINMRI_CSRF_ENABLED"] = False
    response = client.post(
        "/predict", data={"file": (io.BytesIO(png_bytes), "scan.png")},
        content_type="multipart/form-data",
    )
    assert response.status_code == 200


def test_api_needs_no_token(client, png_bytes):
    """The JSON API reads no cookies, so it is exempt from the form token."""
    response = client.post(
        "/api/v1/predict", data={"file": (io.BytesIO(png_bytes), "scan.png")},
        content_type="multipart/form-data",
    )
    assert response.status_code == 200


def test_static_assets(client):
    """CSS and JS are served locally."""
    for path in ("/static/css/app.css", "/static/js/upload.js"):
        response = client.get(path)
        assert response.status_code == 200
        response.close()


def test_confident_result_is_a_finding(pages, png_bytes):
    """A top class at or above BRAINMRI_UNCERTAIN_BELOW (0.625 >= 0.6) is not marked uncertain."""
    html = pages.upload(png_bytes).get_data(as_text=True)
    assert 'data-uncertain="false"' in html
    assert "Uncertain result" not in html and 'id="result-status"' not in html
    assert "Most likely class" in html


def test_low_confidence_is_uncertain(pages, predictor, png_bytes):
    """A weak top class is labelled uncertain and names the threshold."""
    predictor.probabilities = {"glioma": 0.4, "meningioma": 0.35, "no_tumor": 0.05,
                               "pituitary": 0.2}
    html = pages.upload(png_bytes).get_data(as_text=True)
    assert 'data-uncertain="true"' in html
    assert "Uncertain result" in html and "Leaning towards" in html
    assert re.search(
        r'id="result-status"[^>]*>\s*<strong>Uncertain\.</strong> No class reached 60%', html
    )
    assert re.search(r'id="result-label"[^>]*data-class="glioma"[^>]*>Glioma<', html)


def test_uncertainty_threshold_is_config(app, client, pages, png_bytes):
    """The threshold is the single config value BRAINMRI_UNCERTAIN_BELOW."""
    assert app.config["BRAINMRI_UNCERTAIN_BELOW"] == 0.6
    app.config["BRAINMRI_UNCERTAIN_BELOW"] = 0.7
    html = pages.upload(png_bytes).get_data(as_text=True)
    assert 'data-uncertain="true"' in html and "No class reached 70%" in html
    assert "reaches 70%" in " ".join(client.get("/").get_data(as_text=True).split())


@pytest.mark.parametrize("label", CLASSES)
def test_class_description_shown(pages, predictor, png_bytes, label):
    """The predicted class's plain-language description is on the result page."""
    predictor.probabilities = {name: (0.91 if name == label else 0.03) for name in CLASSES}
    html = pages.upload(png_bytes).get_data(as_text=True)
    assert CLASS_DESCRIPTIONS[label] in html
    others = [CLASS_DESCRIPTIONS[name] for name in CLASSES if name != label]
    assert not any(text in html for text in others)


def test_percentages_add_up_on_the_page(pages, predictor, png_bytes):
    """Four thirds-ish values still show percentages that total exactly 100.0%."""
    predictor.probabilities = {"glioma": 1 / 3, "meningioma": 1 / 3, "no_tumor": 1 / 6,
                               "pituitary": 1 / 6}
    html = pages.upload(png_bytes).get_data(as_text=True)
    values = re.findall(r'<span class="prob-value">([\d.]+)%</span>', html)
    assert len(values) == 4
    assert sum(float(v) for v in values) == pytest.approx(100.0)


@given(st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=4, max_size=4).filter(
    lambda values: sum(values) > 1e-6))
def test_rounded_percentages(values):
    """Largest-remainder rounding: total exactly 100, each within 0.1 of its exact value."""
    total = sum(values)
    probabilities = dict(zip(CLASSES, (v / total for v in values)))
    rounded = rounded_percentages(probabilities)
    assert list(rounded) == list(CLASSES)
    assert sum(round(v * 10) for v in rounded.values()) == 1000
    for name, value in rounded.items():
        assert abs(value - probabilities[name] * 100) <= 0.1 + 1e-9


def test_favicon_is_a_real_icon_at_the_root(client):
    """/favicon.ico (where browsers look unasked) is the ICO in static/, 16 to 48 px."""
    from PIL import Image

    from brainmri.config import PROJECT_ROOT

    with client.get("/favicon.ico") as response:
        assert response.status_code == 200
        assert response.mimetype in ("image/vnd.microsoft.icon", "image/x-icon")
        data = response.get_data()
    assert data == (PROJECT_ROOT / "static" / "favicon.ico").read_bytes()
    assert data[:4] == b"\x00\x00\x01\x00"  # ICONDIR: reserved 0, type 1 (icon)
    with Image.open(io.BytesIO(data)) as icon:
        assert icon.format == "ICO"
        assert {(16, 16), (32, 32), (48, 48)} <= set(icon.info["sizes"])


def test_every_page_links_the_icon(client, pages, png_bytes):
    """The upload page, the result page and the error pages name the icon in their head."""
    link = '<link rel="icon" href="/favicon.ico"'
    assert link in client.get("/").get_data(as_text=True)
    assert link in pages.upload(png_bytes).get_data(as_text=True)
    assert link in client.get("/missing").get_data(as_text=True)


def test_atypical_slice_is_uncertain_even_when_its_score_is_high(pages, predictor, png_bytes,
                                                                  monkeypatch):
    """The feature-distance half of the rule: a high score on an atypical slice is no finding."""
    from dataclasses import replace

    real = predictor.predict_checked_batch

    def atypical(*args, **kwargs):
        return [replace(result, uncertain=True) for result in real(*args, **kwargs)]

    monkeypatch.setattr(predictor, "predict_checked_batch", atypical)
    predictor.probabilities = {"glioma": 0.02, "meningioma": 0.02, "no_tumor": 0.94,
                               "pituitary": 0.02}
    html = " ".join(pages.upload(png_bytes).get_data(as_text=True).split())
    assert 'data-uncertain="true"' in html
    assert "looks unlike the training slices of “no tumor”" in html
    assert "No class reached" not in html


def test_reliability_note_quotes_the_measured_held_out_figure(pages, predictor, png_bytes):
    """The note quotes the worst held-out set's confident precision from the metadata."""
    predictor.card.raw["reliability"] = {"worst": {"set": "brats/test", "precision": 0.913,
                                                   "coverage": 0.42, "images": 232}}
    html = " ".join(pages.upload(png_bytes).get_data(as_text=True).split())
    assert "(brats/test: patients or images it never trained on)" in html
    assert "were right 91% of the time" in html and "answered 42% of those slices" in html


def test_reliability_note_claims_no_figure_without_one(pages, png_bytes):
    """Before `brainmri evaluate --write-metadata` the note quotes no number."""
    html = " ".join(pages.upload(png_bytes).get_data(as_text=True).split())
    assert "were right" not in html
    assert "even a confident answer can be wrong" in html
