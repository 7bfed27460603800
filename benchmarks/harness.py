"""Drive a real gunicorn on loopback: start it, load it, watch its workers, break it on purpose.

Shared by benchmarks/load.py (figures) and tests/test_drills.py (the fault drills in CI).
Everything is bounded: every wait has a deadline, every load run a duration, and the server
is always stopped (SIGTERM, then SIGKILL) when the `GunicornServer` context exits.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
READY_LINE = re.compile(r"worker ready pid=(\d+)")

__all__ = [
    "GunicornServer",
    "LoadResult",
    "Outcome",
    "free_port",
    "multipart",
    "post_predict",
    "rss_mib",
    "run_load",
]


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def multipart(image: bytes, filename: str = "scan.jpg", content_type: str = "image/jpeg"
              ) -> tuple[bytes, str]:
    """A multipart/form-data body with the image in field `file`, and its Content-Type."""
    boundary = uuid.uuid4().hex
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"{filename}\"\r\nContent-Type: {content_type}\r\n\r\n").encode()
    return head + image + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@dataclass(frozen=True)
class Outcome:
    """One request: HTTP status (None when the connection failed), latency and when it ended."""

    status: int | None
    ms: float
    ended: float
    started: float = 0.0


def post_predict(port: int, body: bytes, content_type: str, timeout: float = 60.0,
                 headers: dict[str, str] | None = None) -> Outcome:
    """POST one prediction; a refused or reset connection is an Outcome with status None."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/api/v1/predict", body,
                     {"Content-Type": content_type, **(headers or {})})
        response = conn.getresponse()
        response.read()
        status = response.status
    except (OSError, http.client.HTTPException):
        status = None
    finally:
        conn.close()  # also when the worker died mid-request
    ended = time.perf_counter()
    return Outcome(status, (ended - started) * 1e3, ended, started)


def get_status(port: int, path: str, timeout: float = 2.0) -> int | None:
    """Status of a GET, or None when nothing answers."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def rss_mib(pid: int, peak: bool = False) -> float:
    """Resident set (VmRSS, or VmHWM with `peak`) of a process in MiB; NaN if it is gone."""
    key = "VmHWM:" if peak else "VmRSS:"
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (NaN for no values)."""
    return float(np.percentile(values, q)) if values else float("nan")


@dataclass
class LoadResult:
    """Every request of one load run."""

    clients: int
    seconds: float
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def ok(self) -> list[float]:
        """Latencies (ms) of the 200 answers."""
        return [o.ms for o in self.outcomes if o.status == 200]

    @property
    def errors(self) -> list[Outcome]:
        """Requests that did not get a 200."""
        return [o for o in self.outcomes if o.status != 200]

    def summary(self) -> str:
        """One line: req/s, p50/p95/p99 and errors."""
        ok = self.ok
        return (f"{self.clients:>2} clients, {self.seconds:5.1f} s: "
                f"{len(self.outcomes) / self.seconds:6.1f} req/s  p50 {percentile(ok, 50):6.1f} ms  "
                f"p95 {percentile(ok, 95):6.1f} ms  p99 {percentile(ok, 99):6.1f} ms  "
                f"requests {len(self.outcomes)}  errors {len(self.errors)}")


def run_load(port: int, body: bytes, content_type: str, clients: int, seconds: float,
             max_requests: int | None = None, during=None) -> LoadResult:
    """`clients` threads POST back to back for `seconds` (or until `max_requests` in all).

    `during(elapsed_seconds)` is called from the main thread about every 0.2 s, for drills
    that act on the server while it is under load; it returns True to end the run early.
    """
    result = LoadResult(clients, seconds)
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds
    stop = threading.Event()

    issued = [0]

    def client() -> None:
        while time.perf_counter() < deadline and not stop.is_set():
            with lock:  # reserve the request before sending it, so the count is exact
                if max_requests is not None and issued[0] >= max_requests:
                    return
                issued[0] += 1
            outcome = post_predict(port, body, content_type)
            with lock:
                result.outcomes.append(outcome)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        if during is not None and during(time.perf_counter() - started):
            stop.set()
        time.sleep(0.2)
    result.seconds = time.perf_counter() - started
    return result


class GunicornServer:
    """gunicorn (gunicorn.conf.py, main:app) on a free loopback port, logs in a temp file."""

    def __init__(self, env: dict[str, str] | None = None, workers: int | None = None,
                 args: list[str] | None = None) -> None:
        self.port = free_port()
        self.args = list(args or [])  # extra gunicorn options, after (so over) the defaults
        self.env = {**os.environ, "GUNICORN_BIND": f"127.0.0.1:{self.port}",
                    # One loopback address sends everything: per-client limits would answer 429.
                    "FLASK_BRAINMRI_RATE_LIMIT": "0", **(env or {})}
        if workers is not None:
            self.env["WEB_CONCURRENCY"] = str(workers)
        self.log_path = Path(tempfile.mkstemp(prefix="brainmri-gunicorn-", suffix=".log")[1])
        self.process: subprocess.Popen | None = None
        self.started = 0.0

    def start(self) -> None:
        """Start the master (does not wait for readiness)."""
        log = self.log_path.open("ab")
        # A file, not a pipe: an unread pipe fills up and blocks the workers' log writes.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--access-logfile", "/dev/null", *self.args],
            cwd=ROOT, env=self.env, stdout=log, stderr=log, start_new_session=True)
        log.close()
        self.started = time.perf_counter()

    @property
    def log(self) -> str:
        """Everything gunicorn and the app logged so far."""
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> list[int]:
        """The master's current worker processes."""
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.process.pid)],
                             capture_output=True, text=True)
        return sorted(int(p) for p in out.stdout.split())

    def ready_pids(self) -> set[int]:
        """Workers that logged "worker ready" (model loaded) and are still alive."""
        logged = {int(pid) for pid in READY_LINE.findall(self.log)}
        return logged & set(self.worker_pids())

    def wait_ready(self, workers: int, timeout: float = 180.0) -> float:
        """Wait until `workers` live workers have loaded their models; seconds since start.

        Raises:
            RuntimeError: the master exited or the deadline passed (the log tail is included).
        """
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.process.returncode}:\n"
                                   + self.log[-3000:])
            if len(self.ready_pids()) >= workers and get_status(self.port, "/readyz") == 200:
                return time.perf_counter() - self.started
            time.sleep(0.2)
        raise RuntimeError(f"gunicorn not ready after {timeout:.0f} s:\n" + self.log[-3000:])

    def wait_exit(self, timeout: float = 60.0) -> int | None:
        """The master's exit code, or None if it is still running after `timeout` seconds."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> int | None:
        """SIGTERM the master (SIGKILL the group after 60 s); return its exit code."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        code = self.wait_exit(60)
        if code is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            code = self.process.wait(10)
        return code

    def __enter__(self) -> GunicornServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        self.log_path.unlink(missing_ok=True)


@contextmanager
def serving(env: dict[str, str] | None = None, workers: int = 2,
            timeout: float = 180.0) -> Iterator[GunicornServer]:
    """A started, ready server (all `workers` loaded), stopped afterwards."""
    with GunicornServer(env, workers) as server:
        server.wait_ready(workers, timeout)
        yield server
