"""/metrics (web/metrics.py): what is counted, by which labels, and in every gunicorn worker.

The fast tests use the Flask test client and the fake predictor. prometheus-client's default
registry lives as long as the test process, so they compare values before and after. Then the
multiprocess mode in separate processes sharing one folder, and last two real gunicorn workers
(slow: a tiny Keras model).
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from brainmri import create_app
from brainmri.config import PROJECT_ROOT
from brainmri.inference import CLASSES
from brainmri.inference import write_model_card
from brainmri.web import REGISTRY_KEY
from brainmri.web.models import MeasuredRegistry
from conftest import FakePredictor
from conftest import dicom_bytes
from conftest import encode
from conftest import synthetic_slice
from test_ratelimit import limited_app
from test_ratelimit import post_api
from test_ratelimit_redis import tiny_model  # noqa: F401  (a fixture: a small real .h5)


def scrape(client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics and parse it: (sample name, sorted labels) -> value."""
    response = client.get("/metrics")
    assert response.status_code == 200
    return parse(response.get_data(as_text=True))


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples of a Prometheus text exposition by (name, sorted labels)."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples, name: str, **labels: str) -> float:
    """One sample's value (0 when the series does not exist yet)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before, after, name: str, **labels: str) -> float:
    """How much one series grew between two scrapes."""
    return value(after, name, **labels) - value(before, name, **labels)


def post_file(client, data: bytes, filename: str = "scan.png", url: str = "/api/v1/predict"):
    """POST one file to the JSON API."""
    return client.post(url, data={"file": (io.BytesIO(data), filename)},
                       content_type="multipart/form-data")


def post_batch(client, files: list[tuple[bytes, str]]):
    """POST several files to the batch API."""
    form = {"files": [(io.BytesIO(data), name) for data, name in files]}
    return client.post("/api/v1/predict/batch", data=form, content_type="multipart/form-data")


def test_metrics_is_prometheus_text(client):
    """The text format (0.0.4 unless the scraper asks for more), every family named brainmri_."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    assert "version=0.0.4" in response.headers["Content-Type"]
    text = response.get_data(as_text=True)
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {"brainmri_http_requests", "brainmri_http_request_duration_seconds",
            "brainmri_predictions", "brainmri_refusals", "brainmri_uncertain_predictions",
            "brainmri_model_load_seconds"} <= names
    openmetrics = client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert openmetrics.mimetype == "application/openmetrics-text"
    assert openmetrics.get_data(as_text=True).rstrip().endswith("# EOF")


def test_requests_are_counted_by_url_rule_and_status(client, png_bytes):
    """The route label is the URL rule; unknown URLs share one series and never appear raw."""
    before = scrape(client)
    assert client.get("/").status_code == 200
    assert post_file(client, png_bytes).status_code == 200
    assert client.post("/api/v1/predict", data={}).status_code == 400
    assert client.get("/no/such/page-Doe_Jane").status_code == 404
    with client.get("/static/css/app.css") as response:  # a file: closed when read
        assert response.status_code == 200
    after = scrape(client)
    name = "brainmri_http_requests_total"
    assert delta(before, after, name, route="/", status="200") == 1
    assert delta(before, after, name, route="/api/v1/predict", status="200") == 1
    assert delta(before, after, name, route="/api/v1/predict", status="400") == 1
    assert delta(before, after, name, route="unmatched", status="404") == 1
    assert delta(before, after, name, route="/static/<path:filename>", status="200") == 1
    assert delta(before, after, name, route="/metrics", status="200") == 1  # the first scrape
    histogram = "brainmri_http_request_duration_seconds_count"
    assert delta(before, after, histogram, route="/api/v1/predict") == 2
    assert value(after, "brainmri_http_request_duration_seconds_sum", route="/api/v1/predict") > 0
    assert "Doe_Jane" not in client.get("/metrics").get_data(as_text=True)


def test_each_classified_file_is_counted_once_on_every_path(client, pages, png_bytes):
    """The page, the API and the batch API each count their files' classes, once per file."""
    before = scrape(client)
    assert pages.upload(png_bytes).status_code == 200
    assert post_file(client, png_bytes).status_code == 200
    files = [(png_bytes, "a.png"), (b"not an image", "b.png"), (png_bytes, "c.png")]
    assert post_batch(client, files).status_code == 200
    after = scrape(client)
    label = max(FakePredictor().probabilities, key=FakePredictor().probabilities.get)
    assert delta(before, after, "brainmri_predictions_total", model="fake-cnn",
                 **{"class": label}) == 4
    others = [c for c in CLASSES if c != label]
    assert all(delta(before, after, "brainmri_predictions_total", model="fake-cnn",
                     **{"class": c}) == 0 for c in others)
    # An unreadable file is neither a prediction nor a refusal.
    assert all(delta(before, after, "brainmri_refusals_total", model="fake-cnn", reason=r) == 0
               for r in ("not_brain_mri", "wrong_modality"))
    assert delta(before, after, "brainmri_uncertain_predictions_total", model="fake-cnn") == 0


def test_refusals_are_counted_by_reason_and_model(client, predictor, png_bytes):
    """The guard's refusal (not_brain_mri) and a non-MR DICOM (wrong_modality), by their codes."""
    before = scrape(client)
    ct = dicom_bytes(synthetic_slice(), Modality="CT")
    response = post_file(client, ct, "slice.dcm")
    assert response.status_code == 422
    assert response.get_json()["error"]["code"] == "wrong_modality"
    predictor.refuse = ("brain_likeness",)
    response = post_file(client, png_bytes)
    assert response.get_json()["error"]["code"] == "not_brain_mri"
    assert post_batch(client, [(png_bytes, "a.png"), (png_bytes, "b.png")]).status_code == 200
    after = scrape(client)
    assert delta(before, after, "brainmri_refusals_total", model="fake-cnn",
                 reason="wrong_modality") == 1
    assert delta(before, after, "brainmri_refusals_total", model="fake-cnn",
                 reason="not_brain_mri") == 3
    assert sum(delta(before, after, "brainmri_predictions_total", model="fake-cnn",
                     **{"class": c}) for c in CLASSES) == 0


def test_uncertain_answers_are_counted_and_still_predictions(client, predictor, png_bytes):
    """A top class below the threshold: one uncertain answer, and one prediction of that class."""
    predictor.probabilities = {"glioma": 0.4, "meningioma": 0.35, "no_tumor": 0.05,
                               "pituitary": 0.2}
    before = scrape(client)
    assert post_file(client, png_bytes).get_json()["uncertain"] is True
    assert post_batch(client, [(png_bytes, "a.png")]).status_code == 200
    after = scrape(client)
    assert delta(before, after, "brainmri_uncertain_predictions_total", model="fake-cnn") == 2
    assert delta(before, after, "brainmri_predictions_total", model="fake-cnn",
                 **{"class": "glioma"}) == 2


def test_model_load_time_on_first_use_and_from_the_registry(client, png_bytes):
    """The dev server's first prediction and the registry's load (main.py) both record it."""
    assert post_file(client, png_bytes).status_code == 200
    assert value(scrape(client), "brainmri_model_load_seconds", model="fake-cnn") >= 0

    class SlowPredictor(FakePredictor):
        def load(self) -> None:
            time.sleep(0.05)
            super().load()

    registry = MeasuredRegistry({"slow-a": SlowPredictor(name="slow-a"),
                                 "slow-b": SlowPredictor(name="slow-b")}, "slow-a")
    registry.load()
    assert registry.ready
    samples = scrape(client)
    for name in ("slow-a", "slow-b"):
        assert value(samples, "brainmri_model_load_seconds", model=name) >= 0.05
    before = value(samples, "brainmri_model_load_seconds", model="slow-a")
    registry.load()  # loaded already: nothing is timed again
    assert value(scrape(client), "brainmri_model_load_seconds", model="slow-a") == before


def test_the_factory_builds_a_measured_registry(tmp_path):
    """What main.py loads is the registry that records load times (nothing is loaded here)."""
    model = tmp_path / "stand-in.h5"
    model.write_bytes(b"never loaded")
    write_model_card(model, {"name": "stand-in", "version": "1", "classes": list(CLASSES),
                             "input": {"size": 32, "channels": 1}})
    app = create_app({"TESTING": True, "SECRET_KEY": "x", "BRAINMRI_MODEL_PATH": str(model)})
    registry = app.extensions[REGISTRY_KEY]
    assert isinstance(registry, MeasuredRegistry) and not registry.ready


def test_metrics_are_never_rate_limited_nor_logged(png_bytes, caplog):
    """Scrapes pass with the prediction bucket empty; the app logs nothing for them."""
    app, _ = limited_app(BRAINMRI_RATE_LIMIT_BURST=1, BRAINMRI_CSRF_ENABLED=True)
    client = app.test_client()
    assert post_api(client, png_bytes).status_code == 200
    assert post_api(client, png_bytes).status_code == 429  # the limiter is on
    caplog.clear()
    caplog.set_level("DEBUG")
    for _ in range(20):
        assert client.get("/metrics", environ_base={"REMOTE_ADDR": "198.51.100.7"}).status_code == 200
    assert not [r for r in caplog.records if r.name.startswith("brainmri")]
    samples = scrape(client)
    assert value(samples, "brainmri_http_requests_total", route="/api/v1/predict",
                 status="429") >= 1


# --- multiprocess mode: several processes, one folder --------------------------------------

_WORKER = """
import io, sys
from brainmri import create_app
from brainmri.web import EXTENSION_KEY
sys.path.insert(0, "tests")
from conftest import FakePredictor, encode, synthetic_slice

app = create_app({"TESTING": True, "SECRET_KEY": "x", "BRAINMRI_SKIP_MODEL": True,
                  "BRAINMRI_RATE_LIMIT": None})
app.extensions[EXTENSION_KEY] = FakePredictor()
client = app.test_client()
for _ in range(int(sys.argv[1])):
    data = {"file": (io.BytesIO(encode(synthetic_slice())), "scan.png")}
    assert client.post("/api/v1/predict", data=data).status_code == 200
if sys.argv[2] == "scrape":
    sys.stdout.write(client.get("/metrics").get_data(as_text=True))
"""


def test_multiprocess_mode_adds_up_every_process(tmp_path):
    """With PROMETHEUS_MULTIPROC_DIR, a scrape in one process counts what the others did."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}

    def run(requests: int, action: str) -> str:
        done = subprocess.run([sys.executable, "-c", _WORKER, str(requests), action],
                              cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    run(2, "-")
    run(3, "-")
    samples = parse(run(1, "scrape"))
    assert value(samples, "brainmri_http_requests_total", route="/api/v1/predict",
                 status="200") == 6
    assert value(samples, "brainmri_predictions_total", model="fake-cnn",
                 **{"class": "glioma"}) == 6
    assert value(samples, "brainmri_model_load_seconds", model="fake-cnn") >= 0
    assert list(tmp_path.glob("counter_*.db"))


# --- two real gunicorn workers --------------------------------------------------------------

_ACCESS = re.compile(r"\bpid=(\d+) request method=(\S+) path=(\S+) status=(\d{3})")
_LINE = re.compile(r'^ts=\S+Z level=[a-z]+ logger=\S+ pid=\d+ (\S+=|[a-z])')
# TensorFlow 2.21 writes these through absl before it reads TF_CPP_MIN_LOG_LEVEL; nothing but
# turning oneDNN off (other numerics) silences them.
_TF_UNSILENCEABLE = re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\)|"
                               r"^I0000 00:00:\S+ +\d+ port\.cc:\d+\] oneDNN custom operations")


def _request(port: int, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    """One request on its own connection; the response is read and the connection closed."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body, headers or {})
        response = conn.getresponse()
        response.body = response.read()
        return response
    finally:
        conn.close()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_two_gunicorn_workers_count_everything_and_say_no_server(tiny_model, tmp_path):
    """2 workers: requests answered by each, /metrics from either counts all of them.

    Each worker in turn is stopped (SIGSTOP) while requests are sent, so the other one accepts
    them all: which worker answers is then known, not left to the kernel. No response carries
    a Server header, every gunicorn and app log line is logfmt, scrapes are not in the access
    log, and the metrics folder the master made is gone after it stops.
    """
    from benchmarks.harness import GunicornServer
    from benchmarks.harness import multipart

    access_log = tmp_path / "access.log"
    scratch = tmp_path / "tmp"  # where the master makes its metrics folder (tempfile)
    scratch.mkdir()
    env = {"FLASK_BRAINMRI_MODEL_PATH": json.dumps(str(tiny_model)), "TMPDIR": str(scratch)}
    server = GunicornServer(env, 2, ["--access-logfile", str(access_log)])
    # The defaults are under test, not whatever the environment running the tests sets.
    for name in ("PROMETHEUS_MULTIPROC_DIR", "BRAINMRI_LOG_FORMAT", "BRAINMRI_TF_LOGS"):
        server.env.pop(name, None)
    body, content_type = multipart(encode(synthetic_slice()), "scan.png", "image/png")

    def predict(port: int) -> int:
        return _request(port, "POST", "/api/v1/predict", body, {"Content-Type": content_type}).status

    def metrics(port: int) -> dict:
        response = _request(port, "GET", "/metrics")
        assert response.status == 200 and response.getheader("Server") is None
        return parse(response.body.decode())

    with server:
        server.wait_ready(2, timeout=300)
        made = list(scratch.glob("brainmri-metrics-*"))
        assert len(made) == 1 and made[0].is_dir()
        pids = sorted(server.ready_pids())
        assert len(pids) == 2
        answered: dict[int, int] = {}
        scraped = []
        for stopped, serving in ((pids[0], pids[1]), (pids[1], pids[0])):
            os.kill(stopped, signal.SIGSTOP)
            try:
                statuses = [predict(server.port) for _ in range(3)]
                assert statuses == [200, 200, 200], server.log[-3000:]
                answered[serving] = 3
                scraped.append(metrics(server.port))  # answered by `serving`
            finally:
                os.kill(stopped, signal.SIGCONT)

        # The access log says who answered: each worker 3 predictions (no /metrics lines).
        lines = [m.groups() for m in map(_ACCESS.search, access_log.read_text().splitlines()) if m]
        by_pid = {}
        for pid, method, path, status in lines:
            assert path != "/metrics"
            if path == "/api/v1/predict":
                by_pid[int(pid)] = by_pid.get(int(pid), 0) + 1
        assert by_pid == answered

        # What worker B scraped after A's requests includes them, and the reverse.
        first, second = scraped
        assert value(first, "brainmri_http_requests_total", route="/api/v1/predict",
                     status="200") == 3
        assert value(second, "brainmri_http_requests_total", route="/api/v1/predict",
                     status="200") == 6
        assert sum(value(second, "brainmri_predictions_total", model="ratelimit-tiny",
                         **{"class": c}) for c in CLASSES) == 6
        assert value(second, "brainmri_http_requests_total", route="/metrics", status="200") == 1
        assert value(second, "brainmri_model_load_seconds", model="ratelimit-tiny") > 0
        # The pre-flight built the ONNX cache, so both workers serve without TensorFlow.
        assert value(second, "brainmri_model_engine", model="ratelimit-tiny", engine="onnx") == 1

        # No Server header on anything: pages, static, favicon, probes, errors.
        for method, path in (("GET", "/"), ("GET", "/static/css/app.css"), ("GET", "/favicon.ico"),
                             ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/nowhere"),
                             ("DELETE", "/api/v1/predict")):
            response = _request(server.port, method, path)
            assert response.status < 500, (path, response.status)
            assert response.getheader("Server") is None, (path, response.getheaders())
        icon = _request(server.port, "GET", "/favicon.ico")
        assert icon.status == 200 and icon.body[:4] == b"\x00\x00\x01\x00"  # an ICO file

        log = server.log
    assert not list(scratch.glob("brainmri-metrics-*")), "the master left its metrics folder"
    # Every line is logfmt, except TensorFlow's two that nothing can silence.
    for line in (log + access_log.read_text()).splitlines():
        if line.strip() and not _TF_UNSILENCEABLE.match(line):
            assert _LINE.match(line), line
