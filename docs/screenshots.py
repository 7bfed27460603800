"""Regenerate the README screenshots of the pages in headless Chromium.

    uv run python docs/screenshots.py

Serves the real app with the tests' fake predictors (no TensorFlow), named and labelled from
the shipped models' metadata so the model selector reads as it does in production, on a
local port and writes docs/screenshots/{upload,result,uncertain,error}-{desktop,phone}.png. The
scan is a synthetic drawing, never patient data. Needs Debian's chromium (BRAINMRI_CHROMIUM to
point elsewhere); like the browser tests it never downloads a browser.
"""

from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image  # installed with matplotlib
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the fake predictor and the live-server helpers

from conftest import FakePredictor  # noqa: E402
from conftest import encode  # noqa: E402
from conftest import launch_chromium  # noqa: E402
from conftest import serve  # noqa: E402

from brainmri import create_app  # noqa: E402
from brainmri.inference import metadata_path_for  # noqa: E402
from brainmri.inference import ModelRegistry  # noqa: E402
from brainmri.inference import default_model_path  # noqa: E402
from brainmri.inference import discover_models  # noqa: E402
from brainmri.web import EXTENSION_KEY  # noqa: E402
from brainmri.web import REGISTRY_KEY  # noqa: E402

OUT = ROOT / "docs" / "screenshots"
VIEWPORTS = {"desktop": {"width": 1280, "height": 800}, "phone": {"width": 390, "height": 844}}
CONFIDENT = {"glioma": 0.0712, "meningioma": 0.8143, "no_tumor": 0.0468, "pituitary": 0.0677}
UNCERTAIN = {"glioma": 0.45, "meningioma": 0.3, "no_tumor": 0.05, "pituitary": 0.2}
PREVIEW_SIZE = 128


def drawn_slice(size: int = 256) -> bytes:
    """A synthetic axial slice: skull, brain, ventricles and one bright round lesion (PNG)."""
    image = np.zeros((size, size), np.uint8)
    c = size // 2
    cv2.ellipse(image, (c, c), (int(size * 0.36), int(size * 0.44)), 0, 0, 360, 200, -1)
    cv2.ellipse(image, (c, c), (int(size * 0.33), int(size * 0.41)), 0, 0, 360, 70, -1)
    cv2.ellipse(image, (c, c), (int(size * 0.31), int(size * 0.39)), 0, 0, 360, 120, -1)
    for dx in (-1, 1):
        cv2.ellipse(image, (c + dx * size // 22, c - size // 30), (size // 30, size // 9),
                    dx * 12, 0, 360, 35, -1)
    cv2.circle(image, (c + size // 6, c - size // 5), size // 14, 225, -1)
    image = cv2.GaussianBlur(image, (0, 0), size / 160)
    noise = np.random.default_rng(7).normal(0, 6, image.shape)
    return encode(np.clip(image + noise, 0, 255).astype(np.uint8))


def shoot(page, name: str) -> None:
    """Save the visible viewport (what a person sees without scrolling) as a palette PNG."""
    path = OUT / f"{name}.png"
    # The pages are mostly flat colours, so 64 colours keep them crisp and the set small.
    image = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
    image.quantize(64, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    print(f"{path.relative_to(ROOT)}  {path.stat().st_size // 1024} KB")


def fake_registry(probabilities: dict[str, float]) -> ModelRegistry:
    """Fake predictors named after the shipped models (their metadata), all answering `probabilities`."""
    predictors = {}
    for path in discover_models(ROOT / "model"):
        raw = json.loads(metadata_path_for(path).read_text())
        fake = FakePredictor(dict(probabilities), name=raw["name"], raw=raw)
        fake.card.input_size = PREVIEW_SIZE
        predictors[raw["name"]] = fake
    default = json.loads(metadata_path_for(default_model_path(ROOT / "model")).read_text())["name"]
    return ModelRegistry(predictors, default)


def submit(page) -> None:
    """Press Analyse scan and wait for the next page."""
    with page.expect_navigation():
        page.click("#submit-button")


def main() -> None:
    """Write every screenshot."""
    OUT.mkdir(parents=True, exist_ok=True)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    registry = fake_registry(CONFIDENT)
    predictor = registry.get()  # the default model answers
    app = create_app({"SECRET_KEY": "screenshots", "BRAINMRI_SKIP_MODEL": True})
    app.extensions[REGISTRY_KEY] = registry
    app.extensions[EXTENSION_KEY] = predictor
    app.logger.setLevel(logging.WARNING)
    scan = {"name": "scan.png", "mimeType": "image/png", "buffer": drawn_slice()}
    not_an_image = {"name": "scan.png", "mimeType": "image/png", "buffer": b"not an image"}

    with serve(app) as url, sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        for width, viewport in VIEWPORTS.items():
            page = browser.new_page(viewport=viewport)
            page.goto(url + "/")
            shoot(page, f"upload-{width}")
            page.set_input_files("#file-input", scan)
            shoot(page, f"upload-selected-{width}")
            submit(page)
            shoot(page, f"result-{width}")
            predictor.probabilities = UNCERTAIN
            page.goto(url + "/")
            page.set_input_files("#file-input", scan)
            submit(page)
            shoot(page, f"uncertain-{width}")
            predictor.probabilities = CONFIDENT
            page.goto(url + "/")
            page.set_input_files("#file-input", not_an_image)
            submit(page)
            shoot(page, f"error-{width}")
            page.close()
        browser.close()


if __name__ == "__main__":
    main()
