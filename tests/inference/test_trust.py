"""The trust layer without TensorFlow: calibration maths, the OOD guard, and how page and API show it."""

from __future__ import annotations

import base64
import io

import cv2
import numpy as np
import pytest

from brainmri.imaging import ImageError
from brainmri.imaging import read_scan
from brainmri.inference import CLASSES
from brainmri.inference import ModelCard
from brainmri.inference import Predictor
from brainmri.inference import calibration
from brainmri.inference import classify_many
from brainmri.inference import ood
from brainmri.training import ood_sets

from conftest import dicom_bytes
from conftest import encode
from conftest import require_real_data
from conftest import synthetic_slice


def test_calibrated_probabilities_sum_to_one_and_keep_the_ranking():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4) * 0.3, size=200)
    for temperature in (0.5, 1.0, 1.7, 5.0):
        scaled = calibration.apply_temperature(probs, temperature)
        assert np.allclose(scaled.sum(axis=1), 1.0)
        assert (scaled.argmax(1) == probs.argmax(1)).all()
    # A higher temperature makes every answer less confident.
    assert (calibration.apply_temperature(probs, 2.0).max(1) <= probs.max(1) + 1e-12).all()


def test_fit_temperature_recovers_an_overconfident_model():
    """Labels drawn from softmax(z); the model reports softmax(3 z): the fit finds T ≈ 3."""
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 1.5, (4000, 4))
    true = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(4, p=row) for row in true])
    reported = calibration.apply_temperature(true, 1 / 3)
    temperature = calibration.fit_temperature(reported, labels)
    assert temperature == pytest.approx(3.0, rel=0.1)
    after = calibration.apply_temperature(reported, temperature)
    assert calibration.negative_log_likelihood(after, labels) < calibration.negative_log_likelihood(reported, labels)


def test_uncertain_threshold_reaches_the_target_accuracy():
    confidence = np.linspace(0.3, 1.0, 100)
    correct = confidence > 0.6  # everything under 0.6 is wrong
    chosen = calibration.choose_uncertain_threshold(confidence, correct, 0.95)
    assert 0.55 < chosen["uncertain_below"] <= 0.61
    assert chosen["accuracy_confident"] >= 0.95


def _mri_like(seed: int):
    """A decoded upload that looks like a head: a textured ellipse on black."""
    return read_scan(encode(synthetic_slice(160, seed)), 64)


def _fitted_guard() -> ood.OODGuard:
    scans = [_mri_like(seed) for seed in range(40)]
    features = [ood.image_features(scan.model_input, scan.colourfulness) for scan in scans]
    table = {name: np.array([f[name] for f in features]) for name in features[0]}
    rng = np.random.default_rng(0)
    train = rng.normal(size=(80, 6))
    return ood.fit_guard(table, train, np.repeat(np.arange(4), 20), rng.normal(size=(40, 6)))


@pytest.mark.parametrize("category", ood_sets.SYNTHETIC_CATEGORIES)
def test_guard_fitted_on_slices_refuses_every_synthetic_category(category):
    guard = _fitted_guard()
    images = [image for image in ood_sets.synthetic_images() if image.category == category]
    assert images
    for image in images:
        scan = read_scan(image.data, 64)
        verdict = guard.assess(scan.model_input, scan.colourfulness, None)
        assert verdict.refused, (image.name, verdict.scores)


def test_guard_passes_new_slices_and_round_trips_through_metadata():
    guard = ood.OODGuard.from_metadata(_fitted_guard().to_metadata())
    for seed in range(100, 110):
        scan = read_scan(encode(synthetic_slice(160, seed)), 64)
        assert not guard.assess(scan.model_input, scan.colourfulness, None).refused


def _exposure_rows(seeds, embed, alter=None):
    """Exposure inputs of synthetic slices (optionally altered), with a fake 'embedding'."""
    inputs, embeddings = [], []
    for seed in seeds:
        grey = synthetic_slice(160, seed)
        data = encode(alter(grey) if alter else grey)
        scan = read_scan(data, 64)
        x = scan.model_input
        inputs.append(ood.image_features(x, scan.colourfulness))
        embeddings.append(embed(x))
    table = {name: np.array([f[name] for f in inputs]) for name in inputs[0]}
    return np.stack(embeddings), table


def _embed(x):
    """Stand-in for pooled features: coarse 4×4 average intensities of the input."""
    return cv2.resize(x.reshape(x.shape[:2]), (4, 4), interpolation=cv2.INTER_AREA).ravel()


def test_exposure_head_learns_whole_slices_from_patches_and_inversions():
    """Trained on slices vs their patches/inversions (ood_sets.exposure_negatives), it scores
    new slices high and new patches/inversions low, and the guard refuses on that score."""
    pos_emb, pos_feat = _exposure_rows(range(60), _embed)
    negatives = list(ood_sets.exposure_negatives([synthetic_slice(160, s) for s in range(60)]))
    neg_scans = [read_scan(png, 64) for png in negatives]
    neg_inputs = [scan.model_input for scan in neg_scans]
    neg_feat = [ood.image_features(scan.model_input, scan.colourfulness) for scan in neg_scans]
    neg_table = {name: np.array([f[name] for f in neg_feat]) for name in neg_feat[0]}
    neg_emb = np.stack([_embed(x) for x in neg_inputs])
    head = ood.fit_exposure(ood.Exposure.inputs(pos_emb, pos_feat), ood.Exposure.inputs(neg_emb, neg_table))

    new_emb, new_feat = _exposure_rows(range(100, 120), _embed)
    inv_emb, inv_feat = _exposure_rows(range(100, 120), _embed, alter=lambda g: 255 - g)
    patch_emb, patch_feat = _exposure_rows(range(100, 120), _embed, alter=lambda g: g[50:90, 60:100])
    whole, inverted, patch = (head.score(e, f) for e, f in
                              ((new_emb, new_feat), (inv_emb, inv_feat), (patch_emb, patch_feat)))
    assert whole.min() > max(inverted.max(), patch.max()), (whole, inverted, patch)

    val_emb, val_feat = _exposure_rows(range(200, 240), _embed)
    train = np.concatenate([pos_emb, pos_emb])
    guard = ood.fit_guard(val_feat, train, np.repeat(np.arange(4), 30), val_emb, exposure=head)
    low, high = guard.bounds["mri_likeness"]
    assert high is None and low is not None
    restored = ood.OODGuard.from_metadata(guard.to_metadata())
    assert restored.exposure is not None
    np.testing.assert_allclose(restored.exposure.score(inv_emb, inv_feat), inverted, atol=1e-3)
    refused = [restored.check({**{k: v[i] for k, v in inv_feat.items()},
                               **{k: v[i] for k, v in restored.model_scores(inv_emb, inv_feat).items()}})
               for i in range(len(inv_emb))]
    assert all("mri_likeness" in verdict.reasons for verdict in refused)


def test_exposure_negatives_are_patches_and_inversions():
    """Two PNGs per slice: a patch of 20-45 % of each side, and the inverted slice."""
    greys = [synthetic_slice(160, seed) for seed in range(5)]
    pngs = list(ood_sets.exposure_negatives(greys))
    assert len(pngs) == 10
    for grey, patch_png, inverted_png in zip(greys, pngs[::2], pngs[1::2]):
        patch = cv2.imdecode(np.frombuffer(patch_png, np.uint8), cv2.IMREAD_GRAYSCALE)
        assert 0.19 * 160 <= patch.shape[0] <= 0.46 * 160
        inverted = cv2.imdecode(np.frombuffer(inverted_png, np.uint8), cv2.IMREAD_GRAYSCALE)
        np.testing.assert_array_equal(inverted, 255 - grey)


def test_colour_is_measured_on_the_upload_not_the_grey_input():
    grey = encode(cv2.cvtColor(synthetic_slice(), cv2.COLOR_GRAY2BGR), ".jpg")
    colour = encode(cv2.applyColorMap(synthetic_slice(), cv2.COLORMAP_JET), ".jpg")
    assert read_scan(grey, 64).colourfulness < 0.02 < read_scan(colour, 64).colourfulness
    # The grey model input has no colour left to see; the measure is the file's own pixels'.
    assert ood.image_features(read_scan(colour, 64).model_input)["colourfulness"] == 0.0
    # Bytes that do not decode are refused before any guard, so there is no colour to measure.
    with pytest.raises(ImageError):
        read_scan(b"\x00" * 200, 64)


def test_an_upload_is_decoded_once_and_the_guard_checks_that_decode(monkeypatch, tmp_path):
    """classify_many (page, API, CLI): one cv2.imdecode per file; the colour check reads it."""
    card = ModelCard(tmp_path / "m.h5", "m", "1", CLASSES, 64, 1, "0" * 64,
                     {"ood": _fitted_guard().to_metadata()})
    predictor = Predictor(card)  # real guard and calibration; the forward pass is faked
    monkeypatch.setattr(predictor, "forward", lambda batch: (
        np.full((len(batch), len(CLASSES)), 0.25), np.zeros((len(batch), 6))))
    decodes = []
    imdecode = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda *a, **k: decodes.append(1) or imdecode(*a, **k))
    grey = encode(synthetic_slice(160, 100))
    colour = encode(cv2.applyColorMap(synthetic_slice(160, 101), cv2.COLORMAP_JET), ".jpg")
    passed, refused = classify_many(predictor, [grey, colour], 0.6)
    assert len(decodes) == 2
    assert passed.prediction is not None
    assert refused.refused and "colourfulness" in refused.error.verdict.reasons


def _dimmed(grey: np.ndarray, peak: int) -> np.ndarray:
    """`grey` rescaled so that its brightest pixel is `peak` of 255 (a dim or near-black export)."""
    return np.rint(grey.astype(np.float32) * (peak / max(int(grey.max()), 1))).astype(np.uint8)


def test_an_almost_black_file_is_refused_as_such_on_the_shared_path(monkeypatch, tmp_path):
    """An 8-bit slice whose brightest pixels stay at a few grey levels (a volume's end slice) is
    stretched by preprocessing into a full-range frame; the guard refuses it on its file's peak
    brightness, with a reason a user can read. A dim slice with anatomy is not refused on it."""
    card = ModelCard(tmp_path / "m.h5", "m", "1", CLASSES, 64, 1, "0" * 64,
                     {"ood": _fitted_guard().to_metadata()})
    predictor = Predictor(card)  # real guard from its metadata; the forward pass is faked
    monkeypatch.setattr(predictor, "forward", lambda batch: (
        np.full((len(batch), len(CLASSES)), 0.25), np.zeros((len(batch), 6))))
    grey = synthetic_slice(160, 100)
    black, dim = encode(_dimmed(grey, 8)), encode(_dimmed(grey, 60))
    assert read_scan(black, 64).peak_brightness < ood.PEAK_FLOOR < read_scan(dim, 64).peak_brightness
    refused, dimmed, normal = classify_many(predictor, [black, dim, encode(grey)], 0.6)
    assert refused.refused and "peak_brightness" in refused.error.verdict.reasons
    assert "almost black" in str(refused.error) and "no anatomy" in str(refused.error)
    # Its one plain reason, not those of the checks that fail because of it.
    assert len(refused.error.verdict.reasons) > 1, refused.error.verdict.reasons
    assert ";" not in str(refused.error)
    assert not dimmed.refused or "peak_brightness" not in dimmed.error.verdict.reasons
    assert normal.prediction is not None
    # Its 8-bit DICOM copy is refused the same way.
    (black_dicom,) = classify_many(predictor, [ood_sets.as_mr_dicom(_dimmed(grey, 8))], 0.6)
    assert black_dicom.refused and "peak_brightness" in black_dicom.error.verdict.reasons
    # The rule is not fitted: it holds whatever the validation files were, and the metadata
    # carries it; an input with no full scale (peak_brightness None) is not judged by it.
    assert predictor.guard.bounds["peak_brightness"] == (ood.PEAK_FLOOR, None)
    scan = read_scan(black, 64)
    assert "peak_brightness" not in predictor.guard.assess(scan.model_input, 0.0, None).reasons
    # With the guard off (research use) it is classified like any other file.
    (unguarded,) = classify_many(predictor, [black], 0.6, guard=False)
    assert unguarded.prediction is not None


def test_peak_brightness_is_measured_on_8_bit_files_only():
    """PNG, JPEG and 8-bit display DICOM: the 99th percentile of the grey pixels over 255.
    16-bit PNGs and DICOM in scanner units have no full scale, so they are not measured (and
    never refused on it); nor is 8-bit MONOCHROME1, inverted between its own extremes."""
    grey = synthetic_slice(160, 3)
    top = np.percentile(grey, 99) / 255
    assert read_scan(encode(grey), 64).peak_brightness == pytest.approx(top, abs=0.01)
    assert read_scan(encode(grey, ".jpg"), 64).peak_brightness == pytest.approx(top, abs=0.02)
    assert read_scan(encode(_dimmed(grey, 8)), 64).peak_brightness < ood.PEAK_FLOOR
    assert read_scan(encode(grey.astype(np.uint16) * 257), 64).peak_brightness is None
    # An 8-bit DICOM copy of a file is judged exactly as the file (evaluate's DICOM copies).
    for pixels in (grey, _dimmed(grey, 8)):
        assert (read_scan(ood_sets.as_mr_dicom(pixels), 64).peak_brightness
                == read_scan(encode(pixels), 64).peak_brightness)
    assert read_scan(dicom_bytes(_dimmed(grey, 8)), 64).peak_brightness < ood.PEAK_FLOOR
    twelve_bit = _dimmed(grey, 8).astype(np.uint16)  # 8 of 4095: dark, but in scanner units
    assert read_scan(dicom_bytes(twelve_bit, BitsStored=12), 64).peak_brightness is None
    rescaled = dicom_bytes(grey, RescaleSlope=3, RescaleIntercept=0)  # values up to 765
    assert read_scan(rescaled, 64).peak_brightness is None
    assert read_scan(dicom_bytes(255 - grey, "MONOCHROME1"), 64).peak_brightness is None
    assert "peak_brightness" not in ood.image_features(read_scan(encode(grey), 64).model_input)


def test_api_refuses_what_the_guard_refuses(client, predictor, png_bytes):
    predictor.refuse = ("colourfulness",)
    response = client.post("/api/v1/predict", data={"file": (io.BytesIO(png_bytes), "cat.png")},
                           content_type="multipart/form-data")
    assert response.status_code == 422
    body = response.get_json()
    assert body["error"]["code"] == "not_brain_mri"
    assert "colour" in body["error"]["message"]
    assert "label" not in body and "probabilities" not in body


def test_page_refuses_what_the_guard_refuses(app, pages, predictor, png_bytes):
    app.config["BRAINMRI_CSRF_ENABLED"] = False
    predictor.refuse = ("feature_distance",)
    response = pages.upload(png_bytes)
    assert response.status_code == 422
    html = response.get_data(as_text=True)
    assert "does not look like a brain MRI" in html
    assert 'data-class="glioma"' not in html


def test_api_explain_returns_a_heatmap_png_of_the_input_shape(client, predictor, png_bytes):
    response = client.post("/api/v1/predict?explain=true",
                           data={"file": (io.BytesIO(png_bytes), "scan.png")},
                           content_type="multipart/form-data")
    assert response.status_code == 200
    explanation = response.get_json()["explanation"]
    assert explanation["shape"] == [predictor.input_size, predictor.input_size]
    assert explanation["layer"] == "last_conv"
    png = base64.b64decode(explanation["heatmap_png_base64"])
    heatmap = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert heatmap.shape == tuple(explanation["shape"]) and heatmap.max() == 255
    # Form field works too; without it there is no explanation.
    form = client.post("/api/v1/predict", data={"file": (io.BytesIO(png_bytes), "s.png"), "explain": "true"},
                       content_type="multipart/form-data")
    assert "explanation" in form.get_json()
    plain = client.post("/api/v1/predict", data={"file": (io.BytesIO(png_bytes), "s.png")},
                        content_type="multipart/form-data")
    assert "explanation" not in plain.get_json()


def test_result_page_overlays_the_heatmap_with_toggle_and_legend(app, pages, png_bytes):
    app.config["BRAINMRI_CSRF_ENABLED"] = False
    html = pages.upload(png_bytes).get_data(as_text=True)
    assert 'id="heatmap-toggle"' in html and 'type="checkbox"' in html
    assert 'id="scan-heatmap"' in html and 'src="data:image/png;base64,' in html
    assert 'id="heatmap-legend"' in html
    assert "<script>" not in html and "onclick" not in html  # CSP: no inline script


def test_fitted_uncertain_threshold_from_metadata_wins_over_config(app, pages, client, predictor, png_bytes):
    app.config["BRAINMRI_CSRF_ENABLED"] = False
    predictor.uncertain_below = 0.7  # the fake's top class has 0.625
    body = client.post("/api/v1/predict", data={"file": (io.BytesIO(png_bytes), "s.png")},
                       content_type="multipart/form-data").get_json()
    assert body["uncertain"] is True
    html = pages.upload(png_bytes).get_data(as_text=True)
    assert 'data-uncertain="true"' in html and "No class reached 70%" in html


def test_appearance_distance_is_one_class_and_survives_the_metadata():
    """Fitted on brain-like descriptors only, it flags a far descriptor and round-trips."""
    rng = np.random.default_rng(0)
    dims = 12
    train = rng.normal(0, 1, (400, dims))
    val = rng.normal(0, 1, (200, dims))
    features = {name: rng.normal(0.5, 0.01, 200) for name in ood.FEATURES
                if name not in ("feature_distance", "mri_likeness", "appearance_distance")}
    emb = rng.normal(0, 1, (400, 4))
    guard = ood.fit_guard(features, emb, np.zeros(400, int), rng.normal(0, 1, (200, 4)),
                          val_descriptors=val, train_descriptors=train)
    low, high = guard.bounds["appearance_distance"]
    assert low is None and high is not None
    near, far = rng.normal(0, 1, (1, dims)), np.full((1, dims), 6.0)
    assert guard.appearance_distance(near)[0] <= high < guard.appearance_distance(far)[0]
    restored = ood.OODGuard.from_metadata(guard.to_metadata())
    np.testing.assert_allclose(restored.appearance_distance(far), guard.appearance_distance(far),
                               rtol=1e-4)


def test_the_not_mri_audits_list_existing_sartaj_files_with_their_hashes():
    """Each audited path names a SARTAJ file whose bytes still hash as recorded."""
    import hashlib

    from brainmri.training import trust

    listed = trust.listed_not_mri()
    assert len(listed) >= 16 and all(path.startswith("sartaj/") for path in listed)
    root = require_real_data()
    for audit in trust.NOT_MRI_AUDITS.glob("*.tsv"):
        for line in audit.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                path, sha = line.split("\t")
                data = (root / path.removeprefix("sartaj/")).read_bytes()
                assert hashlib.sha256(data).hexdigest() == sha, path
