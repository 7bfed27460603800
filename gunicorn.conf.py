"""Gunicorn settings; gunicorn reads ./gunicorn.conf.py by default (``uv run gunicorn``).

Besides the settings: the master keeps the folder in which the workers' Prometheus metrics are
added up (PROMETHEUS_MULTIPROC_DIR, README "Metrics").

The master must not import the app's libraries before forking (TensorFlow is not fork-safe, and
prometheus_client picks its single- or multiprocess mode when first imported), so nothing here
imports ``brainmri``; prometheus_client is imported only once the folder is set.
"""

import atexit
import glob
import os
import shutil
import sys
import tempfile


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

# TensorFlow defaults to one intra-op thread per core in *every* process; split the cores between
# workers instead. Set here so the workers inherit them, before any of them imports TensorFlow
# (tensorflow#57812: thread counts cannot change after initialisation).
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(max(1, cores // workers)))
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")

# NEVER True with TensorFlow: the model must load in each worker after fork (gunicorn#1891).
preload_app = False
# Worker boot = import TensorFlow + load the .h5 + warm-up; it must fit inside this.
timeout = 120
graceful_timeout = 30
# Recycle workers to cap slow native-memory growth in TensorFlow (tensorflow#33009). A worker
# takes ~20 s to boot (TF import + load + warm-up); with 500 ± 50 both workers reached the limit
# together under benchmarks/serving.py and the app stalled for ~20 s. A jitter of half the
# limit spreads the restarts so one worker is almost always up.
max_requests = 5000
max_requests_jitter = 2500
# URLs only; nothing identifying ever goes into a query string.
accesslog = "-"

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


def on_starting(server):
    """Check every model's files (metadata, sha256) before the port opens or a worker forks.

    Workers that fail together can make gunicorn exit 1, not 4 (its HaltServer is raised again
    while it halts), so the common faults (missing, truncated or replaced model files) are
    caught here, once and deterministically. In a subprocess: the master must not import the
    app's libraries before forking. A model that passes this but that Keras cannot read still
    stops every worker (exit 4) and the master (exit 4, or 1 in that race).
    """
    import subprocess

    if subprocess.run([sys.executable, "-m", "brainmri.preflight"]).returncode != 0:
        raise SystemExit(4)
    _prepare_metrics_dir()  # before the first fork, so every worker inherits it


def child_exit(server, worker):
    """Drop a dead worker's live gauges (its counters stay in the totals)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)

