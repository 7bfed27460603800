"""End-to-end: the real pages in headless Chromium against the real app on a local port.

The app is the production one (form token, CSP, in-memory uploads) with the fake predictor, so
these run in seconds without TensorFlow. Chromium is Debian's `chromium` package, driven by
Playwright with `executable_path`; `playwright install` is never needed. Without Chromium the
tests skip, except under CI=true, where a missing browser is a failure.
"""

from __future__ import annotations

import base64
import os
import shutil
from collections.abc import Iterator

import pytest

from brainmri import create_app
from brainmri.inference import DISCLAIMER
from brainmri.web import EXTENSION_KEY

from conftest import CHROMIUM
from conftest import FakePredictor
from conftest import encode
from conftest import launch_chromium
from conftest import serve
from conftest import synthetic_slice

pytestmark = pytest.mark.browser

# Non-trivial outputs, so the page has to round four unequal numbers that still total 100%.
LIVE_PROBABILITIES = {
    "glioma": 0.0712, "meningioma": 0.8143, "no_tumor": 0.0468, "pituitary": 0.0677,
}
LIVE_PERCENTAGES = {"glioma": "7.1%", "meningioma": "81.4%", "no_tumor": "4.7%",
                    "pituitary": "6.8%"}
UNCERTAIN_PROBABILITIES = {"glioma": 0.45, "meningioma": 0.3, "no_tumor": 0.05, "pituitary": 0.2}
MAX_BYTES = 1024 * 1024  # small, so the oversized-file check needs only a 1.2 MB buffer
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}

# Builds a DataTransfer holding one file, as the OS hands it to the page on a real drop.
MAKE_DATA_TRANSFER = """([b64, name, type]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const transfer = new DataTransfer();
  transfer.items.add(new File([bytes], name, { type }));
  return transfer;
}"""


def _unavailable(reason: str) -> None:
    """Skip, or fail under CI=true: CI must never pass by silently skipping the browser."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true, so this is an error, not a skip)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def live_predictor() -> FakePredictor:
    """The fake predictor behind the live server."""
    return FakePredictor(LIVE_PROBABILITIES)


@pytest.fixture(scope="module")
def live_url(live_predictor) -> Iterator[str]:
    """The production app (form token on) with the fake predictor, served on a free port."""
    app = create_app({
        "SECRET_KEY": "browser-test-secret",
        "BRAINMRI_SKIP_MODEL": True,
        "MAX_CONTENT_LENGTH": MAX_BYTES,
    })
    app.extensions[EXTENSION_KEY] = live_predictor
    with serve(app) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    """Headless system Chromium, one per module."""
    if not (os.path.isfile(CHROMIUM) or shutil.which(CHROMIUM)):
        _unavailable(f"Chromium not found at {CHROMIUM}; apt-get install -y chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed (uv sync installs the dev group)")
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        yield browser
        browser.close()


class Tab:
    """A page in a fresh browser context that records console errors and off-site requests."""

    def __init__(self, browser, base_url: str, viewport: dict, javascript: bool = True) -> None:
        self.base_url = base_url
        self.context = browser.new_context(viewport=viewport, java_script_enabled=javascript)
        self.page = self.context.new_page()
        self.console_errors: list[str] = []
        self.offsite: list[str] = []
        self.page.on("console", self._on_console)
        self.page.on("pageerror", lambda error: self.console_errors.append(str(error)))
        self.page.on("request", self._on_request)

    def _on_console(self, message) -> None:
        if message.type == "error" and "status of 4" not in message.text:
            self.console_errors.append(message.text)  # CSP violations land here too

    def _on_request(self, request) -> None:
        if not request.url.startswith((self.base_url, "data:", "blob:")):
            self.offsite.append(request.url)

    def open(self, path: str = "/"):
        """Navigate to a path of the live app."""
        return self.page.goto(self.base_url + path)

    def drop(self, data: bytes, name: str, mime: str) -> None:
        """Drag a file over the drop zone and drop it there."""
        transfer = self.page.evaluate_handle(
            MAKE_DATA_TRANSFER, [base64.b64encode(data).decode("ascii"), name, mime]
        )
        for event in ("dragenter", "dragover", "drop"):
            self.page.dispatch_event("#drop-zone", event, {"dataTransfer": transfer})

    def submit(self):
        """Press Analyse scan and wait for the next page; returns its response."""
        with self.page.expect_navigation() as navigation:
            self.page.click("#submit-button")
        return navigation.value

    def text(self, selector: str) -> str:
        """Visible text of one element."""
        return self.page.inner_text(selector).strip()

    def in_viewport(self, selector: str) -> bool:
        """True when the element is fully on screen without scrolling."""
        box = self.page.locator(selector).bounding_box()
        size = self.page.viewport_size
        return box is not None and box["y"] >= 0 and box["y"] + box["height"] <= size["height"]

    def fits_width(self) -> bool:
        """No horizontal scrolling."""
        return self.page.evaluate(
            "document.documentElement.scrollWidth <= document.documentElement.clientWidth"
        )


@pytest.fixture
def tab_factory(browser, live_url):
    """Open tabs; after the test, assert none of them logged an error or left the site."""
    tabs: list[Tab] = []

    def open_tab(viewport: dict = DESKTOP, javascript: bool = True) -> Tab:
        tab = Tab(browser, live_url, viewport, javascript)
        tabs.append(tab)
        return tab

    yield open_tab
    for tab in tabs:
        tab.context.close()
    for tab in tabs:
        assert tab.console_errors == []
        assert tab.offsite == []  # nothing loads from the internet


@pytest.fixture
def tab(tab_factory) -> Tab:
    """A desktop-sized tab."""
    return tab_factory()


@pytest.fixture(scope="module")
def scan_png() -> bytes:
    """A synthetic slice as PNG."""
    return encode(synthetic_slice(128))


def test_drop_submit_and_read_result(tab, scan_png):
    """Drop a PNG on the zone, see its preview, submit, read class, percentages and disclaimer."""
    tab.open("/")
    tab.drop(scan_png, "scan.png", "image/png")
    assert tab.page.is_visible("#preview")
    assert tab.page.get_attribute("#preview", "src").startswith("blob:")
    assert tab.text("#file-name").startswith("Selected image")
    assert tab.page.is_hidden("#error-message")

    response = tab.submit()
    assert response.status == 200 and response.url.endswith("/predict")
    page = tab.page
    assert tab.text("#result-label") == "Meningioma"
    assert page.get_attribute("#result-label", "data-class") == "meningioma"
    assert tab.text("#result-confidence") == "81.4% confidence"
    assert page.get_attribute(".result-summary", "data-uncertain") == "false"
    values = {
        row.get_attribute("data-class"): row.locator(".prob-value").inner_text()
        for row in page.locator(".prob-row").all()
    }
    assert values == LIVE_PERCENTAGES
    assert sum(float(v.rstrip("%")) for v in values.values()) == pytest.approx(100.0)
    assert "95.3%" in tab.text("#tumor-summary")  # any tumor = 100% - no tumor
    assert "meninges" in tab.text("#class-description")
    assert DISCLAIMER in tab.text("#disclaimer")
    assert DISCLAIMER in tab.text("#result-disclaimer")
    assert tab.in_viewport("#result-disclaimer")
    assert page.get_attribute("#scan-preview", "src").startswith("data:image/png;base64,")
    assert page.is_visible("#analyse-another")


def test_bars_read_as_text(tab, scan_png):
    """Screen readers get each class with its percentage; the bars themselves are hidden."""
    tab.open("/")
    tab.drop(scan_png, "scan.png", "image/png")
    tab.submit()
    snapshot = tab.page.locator(".prob-list").aria_snapshot()
    for name, value in (("Glioma", "7.1%"), ("Meningioma", "81.4%"), ("No tumor", "4.7%"),
                        ("Pituitary tumor", "6.8%")):
        assert f"listitem: {name} {value}" in snapshot
    assert "progressbar" not in snapshot


def test_non_image_shows_error_page(tab):
    """A text file named .png passes the browser's checks; the server refuses it with a page."""
    tab.open("/")
    tab.page.set_input_files(
        "#file-input", {"name": "scan.png", "mimeType": "image/png", "buffer": b"not an image"}
    )
    response = tab.submit()
    assert response.status == 400
    error = tab.page.locator("#error-message")
    assert error.get_attribute("data-code") == "not_an_image"
    assert "image" in error.inner_text().lower()
    assert "upload page" in tab.text(".next-step")
    assert DISCLAIMER in tab.text("#disclaimer")
    with tab.page.expect_navigation():
        tab.page.click("#back-to-upload")
    assert tab.page.is_visible("#drop-zone")


@pytest.mark.parametrize(
    ("name", "mime", "size", "message"),
    [
        ("notes.txt", "text/plain", 100, "Only PNG, JPEG and DICOM"),
        ("scan.gif", "image/gif", 100, "Only PNG, JPEG and DICOM"),
        ("scan.png", "image/png", MAX_BYTES + 200_000, "larger than 1 MB"),
    ],
)
def test_rejected_in_browser_before_upload(tab, name, mime, size, message):
    """A wrong type or an oversized file is refused on the page, before anything is sent."""
    tab.open("/")
    posts: list[str] = []
    tab.page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    tab.drop(b"\x89PNG" + b"\0" * (size - 4), name, mime)
    assert message in tab.text("#error-message")
    assert tab.page.is_hidden("#preview")
    tab.page.click("#submit-button")  # nothing chosen any more: the page asks for a file
    assert tab.page.is_visible("#error-message")
    assert posts == [] and tab.page.url.endswith("/")


def test_click_and_keyboard_open_the_file_chooser(tab, scan_png):
    """The whole zone opens the chooser on click, and so do Enter and Space from the keyboard."""
    page = tab.page
    # A listener for the whole test keeps Playwright's chooser interception on; toggling it off
    # and on between choosers races with the next key press and lets a real dialog open.
    page.on("filechooser", lambda chooser: None)
    tab.open("/")

    def choose(open_chooser, name: str) -> None:
        # Answer every chooser: Chromium opens no new one while one is still pending.
        with page.expect_file_chooser() as chooser:
            open_chooser()
        chooser.value.set_files(files=[{"name": name, "mimeType": "image/png", "buffer": scan_png}])
        page.wait_for_selector("#preview", state="visible")
        page.evaluate("document.getElementById('preview').hidden = true")  # see the next one

    choose(lambda: page.click("#file-help"), "click.png")  # anywhere in the zone, not the button
    page.focus("#submit-button")
    page.keyboard.press("Shift+Tab")  # back from the button lands on the file input
    assert page.evaluate("document.activeElement.id") == "file-input"
    outline = page.eval_on_selector("#drop-zone", "el => getComputedStyle(el).outlineStyle")
    assert outline == "solid"  # the focus is visible on the zone
    for key in ("Enter", "Space"):
        choose(lambda: page.keyboard.press(key), f"{key}.png")
    assert tab.submit().status == 200


def test_form_works_without_javascript(tab_factory, scan_png):
    """With scripts off the plain file input and submit button still get a result."""
    tab = tab_factory(javascript=False)
    tab.open("/")
    assert tab.page.is_visible("#file-input")
    assert tab.page.is_hidden(".drop-hint")
    tab.page.set_input_files(
        "#file-input", {"name": "scan.png", "mimeType": "image/png", "buffer": scan_png}
    )
    assert tab.submit().status == 200
    assert tab.text("#result-label") == "Meningioma"


@pytest.fixture
def uncertain(live_predictor) -> Iterator[None]:
    """Make the live predictor answer with a weak top class for one test."""
    live_predictor.probabilities = UNCERTAIN_PROBABILITIES
    yield
    live_predictor.probabilities = LIVE_PROBABILITIES


@pytest.mark.usefixtures("uncertain")
def test_low_confidence_is_labelled_uncertain(tab, scan_png):
    """A top class under BRAINMRI_UNCERTAIN_BELOW is shown as uncertain, not as a finding."""
    tab.open("/")
    tab.drop(scan_png, "scan.png", "image/png")
    tab.submit()
    assert tab.text("#summary-heading") == "Uncertain result"
    assert tab.text("#result-status").startswith("Uncertain.")
    assert tab.text("#result-label") == "Glioma"
    assert tab.page.get_attribute(".result-summary", "data-uncertain") == "true"
    assert tab.page.title().startswith("Uncertain result")


def test_phone_width(tab_factory, scan_png):
    """At 390 px: no sideways scrolling, and the result's disclaimer is on screen at once."""
    tab = tab_factory(viewport=PHONE)
    tab.open("/")
    assert tab.fits_width()
    tab.drop(scan_png, "scan.png", "image/png")
    tab.submit()
    assert tab.fits_width()
    assert tab.in_viewport("#result-disclaimer")
    assert tab.in_viewport("#result-label")
    tab.open("/no/such/page")
    assert tab.fits_width()
    assert "upload page" in tab.text(".next-step")
