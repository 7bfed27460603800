"""Prometheus metrics at /metrics: requests, latency, predictions, refusals and model load times.

Under gunicorn each worker is a process with its own memory, so the values live in files in
PROMETHEUS_MULTIPROC_DIR (prometheus-client's multiprocess mode; gunicorn.conf.py creates the
folder before any worker starts and tells the library when a worker dies), and whichever worker
answers /metrics adds up the files of every worker, dead ones included for counters. The
variable is read when prometheus_client is first imported, so it must be set before the app is.
Without it (``flask run``, tests) the metrics are in-process ones in the default registry.

Labels stay bounded: the route is the Flask URL rule (``/api/v1/predict``), never the raw path,
so a scanner probing random URLs adds one series (``unmatched``), not one per URL. Nothing here
names a client, a file or an image. Each classified file is counted once, wherever it was sent
(page, API, batch): uploads.py calls `record_prediction`/`record_refusal` where the outcomes
are produced.
"""

from __future__ import annotations

import os
import time

from flask import Flask
from flask import Response
from flask import g
from flask import request
from prometheus_client import REGISTRY
from prometheus_client import CollectorRegistry
from prometheus_client import Counter
from prometheus_client import Gauge
from prometheus_client import Histogram
from prometheus_client import multiprocess
from prometheus_client.exposition import choose_encoder

from ..inference import Prediction

__all__ = [
    "MULTIPROC_ENV",
    "UNMATCHED_ROUTE",
    "exposition",
    "init_app",
    "record_model_load",
    "record_prediction",
    "record_refusal",
    "record_study",
]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# The route label of requests that matched no URL rule (404, 405).
UNMATCHED_ROUTE = "unmatched"

REQUESTS = Counter(
    "brainmri_http_requests",
    "HTTP requests answered, by Flask URL rule and status code.",
    ["route", "status"],
)
# From a page view in milliseconds to a batch of 16 files on a busy CPU in tens of seconds.
LATENCY = Histogram(
    "brainmri_http_request_duration_seconds",
    "Seconds from the request reaching the app to its response, by Flask URL rule.",
    ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
PREDICTIONS = Counter(
    "brainmri_predictions",
    "Files given a class, by model and predicted class (uncertain answers included).",
    ["model", "class"],
)
REFUSALS = Counter(
    "brainmri_refusals",
    "Readable files refused with no class given, by model and reason code "
    "(not_brain_mri, wrong_modality).",
    ["model", "reason"],
)
UNCERTAIN = Counter(
    "brainmri_uncertain_predictions",
    "Files whose top class fell below the model's 'uncertain' threshold, by model.",
    ["model"],
)
STUDIES = Counter(
    "brainmri_studies",
    "Studies screened (POST /studies, /api/v1/studies), by model, input kind (slices, zip, "
    "dicom_series, nifti) and summary label (tumor, no_tumor, no_answer).",
    ["model", "kind", "label"],
)
STUDY_SLICES = Histogram(
    "brainmri_study_slices",
    "Slices per screened study (blank, refused and unreadable ones included), by model.",
    ["model"],
    buckets=(1, 5, 10, 25, 50, 100, 155, 200, 300, 400),
)
STUDY_SLICE_STATES = Counter(
    "brainmri_study_slice_states",
    "Slices of screened studies by state: scored, blank, refused, unreadable, by model.",
    ["model", "state"],
)
# livemax: the slowest worker still alive, which is what gunicorn's `timeout` must cover; a
# recycled worker's value goes when gunicorn reports it dead (child_exit in gunicorn.conf.py).
MODEL_LOAD = Gauge(
    "brainmri_model_load_seconds",
    "Seconds the model took to load and warm up in a worker (the slowest live worker).",
    ["model"],
    multiprocess_mode="livemax",
)


# Which engine serves each model in the live workers (1 = this one); "keras" where an operator
# expected "onnx" means a missing or stale ONNX cache (docs/deployment.md "gunicorn").
MODEL_ENGINE = Gauge(
    "brainmri_model_engine",
    "1 for the engine (onnx or keras) that serves the model in a live worker.",
    ["model", "engine"],
    multiprocess_mode="livemax",
)


def record_prediction(model: str, prediction: Prediction) -> None:
    """Count one file given a class (and, if so, an uncertain one)."""
    PREDICTIONS.labels(model, prediction.label).inc()
    if prediction.uncertain:
        UNCERTAIN.labels(model).inc()


def record_refusal(model: str, reason: str) -> None:
    """Count one readable file refused with no class (`reason` is the refusal's error code)."""
    REFUSALS.labels(model, reason).inc()


def record_study(model: str, kind: str, summary) -> None:
    """Count one screened study, its slice count and its slices' states (not a file name)."""
    STUDIES.labels(model, kind, summary.label).inc()
    STUDY_SLICES.labels(model).observe(summary.slices)
    for state, count in (("scored", summary.scored), ("blank", summary.blank),
                         ("refused", summary.refused), ("unreadable", summary.unreadable)):
        if count:
            STUDY_SLICE_STATES.labels(model, state).inc(count)


def record_model_load(model: str, seconds: float, engine: str | None = None) -> None:
    """Record how long `model` took to load and warm up in this process, and on which engine."""
    MODEL_LOAD.labels(model).set(seconds)
    if engine:
        MODEL_ENGINE.labels(model, engine).set(1)


def exposition(accept: str | None = None) -> tuple[bytes, str]:
    """Every worker's metrics in the text format the scraper asked for, and its content type."""
    if os.environ.get(MULTIPROC_ENV):
        # A fresh registry per scrape that reads every worker's files; the library says the
        # default one must not be used for this (its metrics would be counted twice).
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    encode, content_type = choose_encoder(accept or "")
    return encode(registry), content_type


def _start_timer() -> None:
    g.metrics_started = time.perf_counter()


def _observe(response: Response) -> Response:
    # The rule, not request.path: a bounded set of label values whatever clients send.
    route = request.url_rule.rule if request.url_rule is not None else UNMATCHED_ROUTE
    REQUESTS.labels(route, str(response.status_code)).inc()
    started = g.get("metrics_started")
    if started is not None:  # None only if an earlier before_request hook failed
        LATENCY.labels(route).observe(time.perf_counter() - started)
    return response


def metrics() -> Response:
    """The Prometheus exposition (keep it from the public: docs/deployment.md "Metrics")."""
    body, content_type = exposition(request.headers.get("Accept"))
    return Response(body, content_type=content_type)


def init_app(app: Flask) -> None:
    """Time and count every request, and serve /metrics (a GET: no form token, no rate limit)."""
    # Registered early, so the timer starts before the rate limiter can refuse a request and
    # the after_request hook (run in reverse order) sees the final status.
    app.before_request(_start_timer)
    app.after_request(_observe)
    app.add_url_rule("/metrics", "metrics", metrics, methods=["GET"])
