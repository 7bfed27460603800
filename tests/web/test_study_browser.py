"""End-to-end in headless Chromium: the study form and result page (issue 34).

Reuses test_browser.py's live server (production app, fake predictor) and tab fixtures; without
Chromium these skip, except under CI=true.
"""

from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path

import numpy as np
import pytest

from brainmri.inference import DISCLAIMER

from conftest import encode
from conftest import synthetic_slice
from test_browser import DESKTOP
from test_browser import browser  # noqa: F401  (fixture)
from test_browser import live_predictor  # noqa: F401  (fixture)
from test_browser import live_url  # noqa: F401  (fixture)
from test_browser import tab_factory  # noqa: F401  (fixture)

pytestmark = pytest.mark.browser

NAME_TAG = "DOE_JANE_MRN12345"


def slice_files(count: int = 5) -> list[dict]:
    files = [{"name": f"{NAME_TAG}_{i + 1}.png", "mimeType": "image/png",
              "buffer": encode(synthetic_slice(96, i))} for i in range(count)]
    files.append({"name": f"{NAME_TAG}_{count + 1}.png", "mimeType": "image/png",
                  "buffer": encode(np.zeros((96, 96), np.uint8))})
    return files


def volume_file() -> dict:
    import nibabel as nib

    x, y, z = np.meshgrid(np.linspace(-1, 1, 48), np.linspace(-1, 1, 48), np.linspace(-1, 1, 9),
                          indexing="ij")
    inside = x**2 / 0.6 + y**2 / 0.8 + z**2 / 0.7 < 1
    volume = np.where(inside, 300.0 * (1.5 + x), 0.0).astype(np.float32)
    data = gzip.compress(nib.Nifti1Image(volume, np.eye(4)).to_bytes())
    return {"name": f"{NAME_TAG}.nii.gz", "mimeType": "application/gzip", "buffer": data}


def submit_study(tab, files: list[dict]):
    tab.open("/studies")
    tab.page.set_input_files("#study-files", files)
    with tab.page.expect_navigation() as navigation:
        tab.page.click("#study-submit")
    return navigation.value


@pytest.mark.parametrize("javascript", [False, True])
def test_study_slices_result_page(tab_factory, javascript):  # noqa: F811
    tab = tab_factory(DESKTOP, javascript=javascript)
    response = submit_study(tab, slice_files())
    assert response.status == 200
    page = tab.page
    # Summary and disclaimer on top, on screen without scrolling.
    assert DISCLAIMER in tab.text("#result-disclaimer")
    assert tab.in_viewport("#result-disclaimer") and tab.in_viewport("#study-summary-heading")
    assert "6 slices" in tab.text("#study-counts") and "1 blank" in tab.text("#study-counts")
    # The server-rendered plot, described for screen readers.
    plot = page.locator("#study-plot")
    assert plot.get_attribute("role") == "img"
    assert page.locator("#study-plot circle.plot-scored").count() == 5
    assert page.locator("#study-plot line.plot-blank").count() == 1
    # Thumbnails, most suspicious first, each a link to its full single-slice result.
    links = page.locator("#slice-thumbnails a")
    assert links.count() == 5
    links.first.focus()
    page.keyboard.press("Enter")
    target = links.first.get_attribute("href")
    assert page.url.endswith(target)
    assert page.locator(target).locator("li.prob-row").count() == 4
    # Every image has alt text (decorative thumbnails carry an empty alt, their link has text).
    assert page.locator("img:not([alt])").count() == 0
    assert NAME_TAG not in page.content()
    # The CSV download works without JavaScript (a data: link with `download`).
    with page.expect_download() as download:
        page.click("#csv-download")
    rows = list(csv.reader(io.StringIO(Path(download.value.path()).read_text(encoding="utf-8"))))
    assert rows[0][:3] == ["study", "slice_index", "source"]
    assert len(rows) == 1 + 6 + 1


def test_study_volume_and_refusal_pages(tab_factory):  # noqa: F811
    tab = tab_factory()
    response = submit_study(tab, [volume_file()])
    assert response.status == 200
    assert "9 slices" in tab.text("#study-counts")
    assert tab.page.locator("tr[data-state='blank']").count() >= 2
    # A ZIP holding something else: refused with a clear message on the error page.
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes.txt", "hello")
    response = submit_study(tab, [{"name": "study.zip", "mimeType": "application/zip",
                                   "buffer": buffer.getvalue()}])
    assert response.status == 400
    assert "not a PNG, JPEG or DICOM" in tab.page.content()
