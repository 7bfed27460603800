"""Start-up and memory of the real gunicorn: seconds to /readyz, RSS per worker, worker respawn.

    uv run python benchmarks/startup.py                 # ONNX engine: first start, then again
    uv run python benchmarks/startup.py --keras         # also the TensorFlow engine, to compare
    uv run python benchmarks/startup.py --repeats 5

A "first start" uses an empty ONNX cache folder, so it includes the master's one-off conversion
of every model (`brainmri.preflight`, TensorFlow in a subprocess); "again" reuses that folder,
which is every start after the first (or every start, with `brainmri build-cache` at image
build time). Each run also reports the worker RSS, whether a worker mapped TensorFlow, how long a
killed worker takes to serve again (what a `max_requests` recycle costs), and the files a start
left in the temp folder. Medians over --repeats; the machine is shared, so read ratios.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import GunicornServer  # noqa: E402
from benchmarks.harness import rss_mib  # noqa: E402


def _maps_tensorflow(pid: int) -> bool:
    """True when the process has TensorFlow's shared library mapped (it imported TensorFlow)."""
    try:
        return "libtensorflow" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _temp_files() -> set[str]:
    return set(os.listdir(tempfile.gettempdir()))


def one_start(cache: Path, engine: str, workers: int) -> dict:
    """Start gunicorn once on `cache`; ready time, RSS, TensorFlow, respawn time, temp files."""
    before = _temp_files()
    env = {"BRAINMRI_CACHE_DIR": str(cache), "BRAINMRI_ENGINE": engine}
    with GunicornServer(env, workers) as server:
        ready = server.wait_ready(workers, timeout=600)
        pids = sorted(server.ready_pids())
        rss = [rss_mib(pid) for pid in pids]
        tensorflow = any(_maps_tensorflow(pid) for pid in pids)
        # A recycled worker (max_requests) is a fresh process: kill one, time its successor.
        os.kill(pids[0], signal.SIGTERM)
        killed = time.perf_counter()
        deadline = killed + 300
        respawn = float("nan")
        while time.perf_counter() < deadline:
            fresh = server.ready_pids() - set(pids)
            if fresh:
                respawn = time.perf_counter() - killed
                break
            time.sleep(0.1)
    left = sorted(name for name in _temp_files() - before
                  if not name.startswith(("brainmri-gunicorn-", "pymp-", "prometheus")))
    return {"ready": ready, "rss": rss, "tensorflow": tensorflow, "respawn": respawn,
            "left": left}


def report(label: str, runs: list[dict]) -> None:
    """Print medians (and the spread) of several starts."""
    ready = [run["ready"] for run in runs]
    rss = [max(run["rss"]) for run in runs]
    respawn = [run["respawn"] for run in runs]
    print(f"{label:<28} ready {statistics.median(ready):5.1f} s (min {min(ready):.1f}, "
          f"max {max(ready):.1f})  worker RSS {statistics.median(rss):4.0f} MiB (max)  "
          f"respawn {statistics.median(respawn):4.1f} s  TensorFlow in workers: "
          f"{'yes' if any(run['tensorflow'] for run in runs) else 'no'}  "
          f"temp files left: {sum(len(run['left']) for run in runs)}"
          + (f" {runs[0]['left'][:3]}" if runs[0]["left"] else ""))


def main() -> None:
    """Measure the ONNX engine's first and later starts (and the Keras engine's with --keras)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--keras", action="store_true", help="also measure BRAINMRI_ENGINE=keras")
    args = parser.parse_args()
    print(f"{args.workers} workers, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f} at start")
    with tempfile.TemporaryDirectory(prefix="brainmri-cache-") as root:
        first = [one_start(Path(root) / f"first{i}", "auto", args.workers)
                 for i in range(args.repeats)]
        report("ONNX, first start (build)", first)
        again = [one_start(Path(root) / "first0", "auto", args.workers)
                 for _ in range(args.repeats)]
        report("ONNX, again (cache there)", again)
        if args.keras:
            keras = [one_start(Path(root) / "unused", "keras", args.workers)
                     for _ in range(args.repeats)]
            report("Keras engine", keras)
            print(f"ready: Keras / ONNX again = "
                  f"{statistics.median(r['ready'] for r in keras) / statistics.median(r['ready'] for r in again):.1f}x; "
                  f"RSS: {statistics.median(max(r['rss']) for r in keras) / statistics.median(max(r['rss']) for r in again):.1f}x")


if __name__ == "__main__":
    main()
