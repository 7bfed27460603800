"""Serving benchmark: predictor latency in-process, then HTTP latency and throughput on gunicorn.

Prints medians and percentiles (the machine is shared and noisy; compare ratios, not single
runs). Loopback only, bounded in time.

    uv run python benchmarks/serving.py                      # shipped model, a real MRI if found
    uv run python benchmarks/serving.py --image scan.jpg --clients 4 --seconds 20
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from brainmri.config import DEFAULTS  # noqa: E402
from brainmri.inference import default_model_path  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile of `values` (q in 0..100)."""
    return float(np.percentile(values, q))


def default_image() -> bytes:
    """A real MRI JPEG from the data set when present, else a synthetic 512² slice."""
    data = Path(os.environ.get("BRAINMRI_DATA", ROOT.parent / "shared" / "data" / "sartaj"))
    candidates = sorted((data / "Testing").glob("*/*.jpg")) if data.is_dir() else []
    if candidates:
        return candidates[0].read_bytes()
    image = np.zeros((512, 512), np.uint8)
    cv2.ellipse(image, (256, 256), (180, 220), 0, 0, 360, 110, -1)
    cv2.circle(image, (200, 220), 40, 230, -1)
    return cv2.imencode(".jpg", image)[1].tobytes()


def bench_predictor(model: Path, image: bytes, n: int) -> None:
    """Load time, preprocessing and inference latency through the Predictor."""
    from brainmri.inference import Predictor

    started = time.perf_counter()
    predictor = Predictor.from_path(model)
    predictor.load()
    load_s = time.perf_counter() - started
    prep, infer, total = [], [], []
    for _ in range(n):
        t0 = time.perf_counter()
        array = predictor.prepare(image)
        t1 = time.perf_counter()
        predictor.predict(array)
        t2 = time.perf_counter()
        prep.append((t1 - t0) * 1e3)
        infer.append((t2 - t1) * 1e3)
        total.append((t2 - t0) * 1e3)
    batch = np.stack([predictor.prepare(image)] * 32)
    predictor.predict_arrays(batch)
    t0 = time.perf_counter()
    for _ in range(5):
        predictor.predict_arrays(batch)
    batch_ips = 5 * 32 / (time.perf_counter() - t0)
    print(f"predictor: load+warm-up {load_s:.2f} s (TF import included)")
    for name, values in (("preprocess", prep), ("inference", infer), ("total", total)):
        print(f"  {name:>10}: p50 {percentile(values, 50):6.2f} ms  p95 {percentile(values, 95):6.2f} ms"
              f"  (n={n})")
    print(f"  batch of 32: {batch_ips:.0f} images/s")


def multipart(image: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body with the image in field `file`."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"scan.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def post(port: int, body: bytes, content_type: str) -> tuple[int, float]:
    """POST one prediction; return (status, milliseconds)."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/api/v1/predict", body, {"Content-Type": content_type})
    response = conn.getresponse()
    response.read()
    conn.close()
    return response.status, (time.perf_counter() - t0) * 1e3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_pids(master: int) -> list[int]:
    """Child processes of the gunicorn master (its workers)."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(master)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of a process in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_http(model: Path, image: bytes, n: int, clients: int, seconds: float) -> None:
    """Start gunicorn on loopback and measure readiness, latency and throughput."""
    port = free_port()
    env = {**os.environ, "GUNICORN_BIND": f"127.0.0.1:{port}", "FLASK_BRAINMRI_MODEL_PATH": str(model)}
    env["FLASK_BRAINMRI_RATE_LIMIT"] = "0"  # one loopback client sends every request
    started = time.perf_counter()
    # Logs go to a file: an unread pipe fills up and blocks the workers' log writes.
    log = tempfile.TemporaryFile()
    server = subprocess.Popen([sys.executable, "-m", "gunicorn", "--access-logfile", "/dev/null"],
                              cwd=ROOT, env=env, stdout=log, stderr=log)
    try:
        ready_s = None
        while time.perf_counter() - started < 120:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/readyz")
                if conn.getresponse().status == 200:
                    ready_s = time.perf_counter() - started
                    break
            except OSError:
                pass
            time.sleep(0.1)
        if ready_s is None:
            raise SystemExit("gunicorn did not become ready in 120 s")
        # /readyz answers from one worker; give the others their own boot.
        time.sleep(2)
        workers = worker_pids(server.pid)
        print(f"gunicorn: {len(workers)} workers, first /readyz 200 after {ready_s:.2f} s")
        body, content_type = multipart(image)
        for _ in range(5):
            post(port, body, content_type)
        latencies = [post(port, body, content_type)[1] for _ in range(n)]
        print(f"  HTTP, 1 client: p50 {percentile(latencies, 50):.2f} ms  "
              f"p95 {percentile(latencies, 95):.2f} ms  (n={n})")
        results: list[tuple[int, float]] = []
        lock = threading.Lock()
        deadline = time.perf_counter() + seconds

        def client() -> None:
            while time.perf_counter() < deadline:
                outcome = post(port, body, content_type)
                with lock:
                    results.append(outcome)

        threads = [threading.Thread(target=client) for _ in range(clients)]
        t0 = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - t0
        ok = [ms for status, ms in results if status == 200]
        print(f"  HTTP, {clients} clients for {elapsed:.1f} s: {len(results) / elapsed:.1f} req/s, "
              f"p50 {percentile(ok, 50):.1f} ms  p95 {percentile(ok, 95):.1f} ms, "
              f"errors {len(results) - len(ok)}")
        # Workers recycle after max_requests (gunicorn.conf.py), so list them again.
        current = worker_pids(server.pid)
        recycled = len(set(workers) - set(current))
        print("  peak RSS per worker: " + ", ".join(f"{peak_rss_mb(p):.0f} MiB" for p in current)
              + f" ({recycled} worker(s) recycled by max_requests during the run)")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=default_model_path(Path(DEFAULTS["BRAINMRI_MODEL_DIR"])))
    parser.add_argument("--image", type=Path, help="image to send (default: a real MRI if present)")
    parser.add_argument("-n", type=int, default=200, help="sequential requests per measurement")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    image = args.image.read_bytes() if args.image else default_image()
    print(json.dumps({"model": str(args.model), "image_bytes": len(image), "cpus": os.cpu_count()}))
    bench_predictor(args.model, image, args.n)
    bench_http(args.model, image, args.n, args.clients, args.seconds)


if __name__ == "__main__":
    main()
