"""Gunicorn settings; gunicorn reads ./gunicorn.conf.py by default (``uv run gunicorn``).

Besides the settings: TensorFlow's C++ logs are off in the workers (BRAINMRI_TF_LOGS=1 turns
them on), every line gunicorn writes is logfmt or JSON like the app's (BRAINMRI_LOG_FORMAT), the
responses carry no ``Server`` header, and the master keeps the folder in which the workers'
Prometheus metrics are added up (PROMETHEUS_MULTIPROC_DIR, docs/deployment.md "Metrics").

The master must not import the app's libraries before forking (TensorFlow is not fork-safe, and
prometheus_client picks its single- or multiprocess mode when first imported), so nothing here
imports ``brainmri``; prometheus_client is imported only once the folder is set.
"""

import atexit
import glob
import importlib.util
import os
import shutil
import sys
import tempfile
from logging.handlers import SysLogHandler
from pathlib import Path

from gunicorn.glogging import Logger as _GunicornLogger


def _cpu_count() -> int:
    """Cores this process may run on (respects taskset/cgroup CPU affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not available on macOS
        return os.cpu_count() or 1


cores = _cpu_count()

wsgi_app = "main:app"
# Behind a reverse proxy on the same host; set GUNICORN_BIND=0.0.0.0:8000 only in a container.
bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")
# Threads keep pages, static files and probes responsive while one request runs inference
# (inference itself is serialised by a lock in each worker).
worker_class = "gthread"
# Each worker holds its own copy of the model, so scale with processes, not (2 × cores) + 1.
workers = int(os.environ.get("WEB_CONCURRENCY", min(2, cores)))
threads = int(os.environ.get("GUNICORN_THREADS", "2"))

# onnxruntime and TensorFlow default to one intra-op thread per core in *every* process; split
# the cores between workers instead. The ONNX engine reads TF_NUM_INTRAOP_THREADS too (unless
# BRAINMRI_ONNX_THREADS is set). Set here so the workers inherit it, before any of them imports
# TensorFlow (tensorflow#57812: thread counts cannot change after initialisation).
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(max(1, cores // workers)))
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
# TensorFlow's C++ side logs oneDNN, CPU-feature and allocator notes to stderr at INFO; read when
# TensorFlow loads, so set here for the workers. BRAINMRI_TF_LOGS=1 shows everything. 3 hides
# its ERROR lines too; the failures that matter here (a model that will not load) reach the app
# as Python exceptions and are logged there. An operator's own TF_CPP_MIN_LOG_LEVEL is kept, as
# preflight.quiet_tensorflow keeps it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL",
                      "0" if os.environ.get("BRAINMRI_TF_LOGS") == "1" else "3")

# Never True: each worker loads its models after fork (TensorFlow, when a model is served by it,
# is not fork-safe: gunicorn#1891), and the master stays free of the app's libraries.
preload_app = False
# Worker boot: about 1 s on the ONNX engine, about 20 s on TensorFlow (import, .h5, warm-up);
# the longer must fit inside this.
timeout = 120
graceful_timeout = 30
# Recycle workers to cap slow native-memory growth (tensorflow#33009 on the Keras engine). A
# TensorFlow worker took ~20 s to boot; with 500 ± 50 both workers reached the limit together
# under benchmarks/serving.py and the app stalled for ~20 s. A jitter of half the limit spreads
# the restarts so one worker is almost always up (an ONNX worker is back in about a second).
max_requests = 5000
max_requests_jitter = 2500
# Paths only (no query string, client address, referrer or user agent): nothing identifying.
accesslog = "-"
# logfmt pairs (JsonFormatter makes them JSON fields); the request id ties the line to the
# app's own lines for that request. The pid is in every line's header.
_ACCESS_LOG_FORMAT = (
    "request method=%(m)s path=%(U)s status=%(s)s bytes=%(B)s duration_ms=%(M)s "
    "request_id=%({x-request-id}o)s"
)
access_log_format = _ACCESS_LOG_FORMAT


def _load_logformat():
    """brainmri/web/logformat.py, loaded by its path (importing brainmri would pull in Flask)."""
    path = Path(__file__).resolve().parent / "brainmri" / "web" / "logformat.py"
    spec = importlib.util.spec_from_file_location("_brainmri_logformat", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_logformat = _load_logformat()
_LOG_FORMAT = _logformat.format_from_env()  # an unknown name stops gunicorn here


class StructuredLogger(_GunicornLogger):
    """gunicorn's logger writing BRAINMRI_LOG_FORMAT lines, with no access line for /metrics."""

    def setup(self, cfg):
        """gunicorn's handlers (--error-logfile, --access-logfile), with our line format.

        An access line in a format of the operator's own (--access-logformat) is written as
        that format makes it, like gunicorn does.
        """
        super().setup(cfg)
        line = _logformat.formatter(_LOG_FORMAT)
        logs = [self.error_log]
        if cfg.access_log_format == _ACCESS_LOG_FORMAT:
            logs.append(self.access_log)
        for log in logs:
            for handler in log.handlers:
                # syslog keeps gunicorn's format: it carries the prefix syslog routes on.
                if getattr(handler, "_gunicorn", False) and not isinstance(handler, SysLogHandler):
                    handler.setFormatter(line)

    def access(self, resp, req, environ, request_time):
        """One line per request, except the scraper's every-15-seconds GET /metrics."""
        if environ.get("PATH_INFO") == "/metrics":
            return
        super().access(resp, req, environ, request_time)


logger_class = StructuredLogger

_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Set to the folder this file created, so a master can tell its own from the operator's.
_OWNED_ENV = "BRAINMRI_METRICS_DIR_CREATED"


def _remove_metrics_dir(path, owner_pid):
    # atexit runs in the workers too (they leave through SystemExit): only the master removes.
    if os.getpid() == owner_pid:
        shutil.rmtree(path, ignore_errors=True)


def _prepare_metrics_dir():
    """A fresh folder for this master's workers' metrics, unless the operator named one.

    The operator's folder is emptied of prometheus-client's files instead: values from an
    earlier run would otherwise be added to this one's. A master started by ``kill -USR2``
    inherits its parent's folder in the environment and takes a new one of its own.
    """
    given = os.environ.get(_MULTIPROC_ENV)
    if given and os.environ.get(_OWNED_ENV) != given:
        os.makedirs(given, exist_ok=True)
        for stale in glob.glob(os.path.join(given, "*.db")):
            os.remove(stale)
        return
    path = tempfile.mkdtemp(prefix="brainmri-metrics-")
    os.environ[_MULTIPROC_ENV] = path
    os.environ[_OWNED_ENV] = path
    # atexit, not on_exit: it also runs when the master stops on an unhandled error.
    atexit.register(_remove_metrics_dir, path, os.getpid())


def _drop_server_header():
    """Send no ``Server`` header (gunicorn has no setting for it; benoitc/gunicorn#825).

    gunicorn writes ``Server: gunicorn`` in ``Response.default_headers`` whatever the app sets
    (an app's own Server header is sent beside it), so the line is filtered out there. Checked
    against a real server by tests/web/test_metrics_endpoint.py.
    """
    from gunicorn.http import wsgi

    original = getattr(wsgi.Response, "default_headers", None)
    if original is None:
        sys.stderr.write("gunicorn.conf.py: gunicorn.http.wsgi.Response.default_headers is gone; "
                         "responses carry gunicorn's Server header\n")
        return
    if getattr(original, "drops_server_header", False):
        return

    def default_headers(self):
        return [line for line in original(self) if not line.lower().startswith("server:")]

    default_headers.drops_server_header = True
    wsgi.Response.default_headers = default_headers


def on_starting(server):
    """Check every model's files (metadata, sha256) and build missing ONNX caches, before the
    port opens or a worker forks.

    Workers that fail together can make gunicorn exit 1, not 4 (its HaltServer is raised again
    while it halts), so the common faults (missing, truncated or replaced model files) are
    caught here, once and deterministically. In a subprocess: the master must not import the
    app's libraries before forking. Building a cache loads the model in Keras, so a model Keras
    cannot read stops the start here too (exit 4).
    """
    import subprocess

    if subprocess.run([sys.executable, "-m", "brainmri.preflight"]).returncode != 0:
        raise SystemExit(4)
    # Before the first fork, so every worker inherits both.
    _prepare_metrics_dir()
    _drop_server_header()


def child_exit(server, worker):
    """Drop a dead worker's live gauges (its counters stay in the totals)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)

