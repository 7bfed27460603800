"""Load, soak and fault drills against gunicorn on 127.0.0.1 with the shipped models.

Clients upload a real-size MRI JPEG back to back to POST /api/v1/predict. Prints req/s,
p50/p95/p99 latency, errors, and each worker's RSS at start and end. Loopback only; every run
is bounded by --seconds (and the soak by --soak-seconds). The machine is shared and noisy:
compare medians and ratios, not single runs.

    uv run python benchmarks/load.py                         # 1, 4 and 8 clients, 30 s each
    uv run python benchmarks/load.py --clients 8 --seconds 60
    uv run python benchmarks/load.py --soak-seconds 600      # 10-minute soak, 8 clients
    uv run python benchmarks/load.py --drills                # the fault drills
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import drills  # noqa: E402
from benchmarks.harness import multipart  # noqa: E402
from benchmarks.harness import percentile  # noqa: E402
from benchmarks.harness import rss_mib  # noqa: E402
from benchmarks.harness import run_load  # noqa: E402
from benchmarks.harness import serving  # noqa: E402
from benchmarks.serving import default_image  # noqa: E402


def _rss(server) -> str:
    return ", ".join(f"{pid}: {rss_mib(pid):.0f} MiB" for pid in sorted(server.ready_pids()))


def load_runs(image: bytes, clients: list[int], seconds: float, workers: int,
              max_requests: int) -> None:
    """One server; a warm-up, then a timed run per client count."""
    body, content_type = multipart(image)
    with serving(workers=workers) as server:
        ready_s = server.wait_ready(workers)
        print(f"gunicorn: {workers} workers ready (all models loaded) after {ready_s:.1f} s")
        print(f"  RSS at start: {_rss(server)}")
        run_load(server.port, body, content_type, 2, 5.0)  # warm-up, not reported
        for count in clients:
            result = run_load(server.port, body, content_type, count, seconds, max_requests)
            print("  " + result.summary(), flush=True)
        print(f"  RSS at end:   {_rss(server)}")


def soak(image: bytes, clients: int, seconds: float, workers: int, sample_every: float,
         max_requests: int) -> None:
    """`clients` clients for `seconds`; RSS of every live worker sampled along the way."""
    body, content_type = multipart(image)
    with serving(workers=workers) as server:
        start_pids = sorted(server.ready_pids())
        print(f"soak: {clients} clients for {seconds:.0f} s; RSS at start: {_rss(server)}")
        samples: dict[int, list[tuple[float, float]]] = {}
        next_sample = [0.0]

        def during(elapsed: float) -> bool:
            if elapsed >= next_sample[0]:
                for pid in server.worker_pids():
                    samples.setdefault(pid, []).append((elapsed, rss_mib(pid)))
                print(f"  t={elapsed:5.0f} s  " + ", ".join(
                    f"{pid}: {rss_mib(pid):.0f} MiB" for pid in server.worker_pids()), flush=True)
                next_sample[0] += sample_every
            return False

        result = run_load(server.port, body, content_type, clients, seconds, max_requests,
                          during=during)
        end_pids = sorted(server.ready_pids())
        print("  " + result.summary())
        print(f"  RSS at end: {_rss(server)}")
        for pid, values in sorted(samples.items()):
            rss = [v for _, v in values if not math.isnan(v)]
            if len(rss) >= 2:
                print(f"  worker {pid}: first {rss[0]:.0f} MiB, last {rss[-1]:.0f} MiB, "
                      f"max {max(rss):.0f} MiB over {values[-1][0] - values[0][0]:.0f} s")
        # Every worker seen that was not there at the start replaced one (max_requests recycling).
        replacements = sorted((set(samples) | set(end_pids)) - set(start_pids))
        print(f"  workers started during the soak (recycled by max_requests): {len(replacements)}; errors "
              f"{len(result.errors)}; p99 {percentile(result.ok, 99):.1f} ms")


def run_drills(image: bytes) -> None:
    """Every fault drill, one after another, printed as JSON lines."""
    model_dir = ROOT / "model"
    with tempfile.TemporaryDirectory() as work:
        for kind in ("missing", "corrupt", "unloadable"):
            print(json.dumps({"drill": "bad_model", **drills.bad_model(kind, model_dir, Path(work))}),
                  flush=True)
    print(json.dumps({"drill": "kill_worker", **drills.kill_worker(image)}), flush=True)
    print(json.dumps({"drill": "sigterm_master", **drills.sigterm_master(image)}), flush=True)
    print(json.dumps({"drill": "big_uploads", **drills.big_uploads(image)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, help="image to send (default: a real MRI if present)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--seconds", type=float, default=30.0, help="per client count")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-requests", type=int, default=200_000,
                        help="stop a run after this many requests, whatever --seconds says")
    parser.add_argument("--soak-seconds", type=float, default=0.0,
                        help="run a soak of this length instead (8 clients unless --clients)")
    parser.add_argument("--sample-every", type=float, default=30.0, help="soak RSS sampling, s")
    parser.add_argument("--drills", action="store_true", help="run the fault drills instead")
    args = parser.parse_args()
    image = args.image.read_bytes() if args.image else default_image()
    print(json.dumps({"image_bytes": len(image), "cpus": os.cpu_count(),
                      "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
    if args.drills:
        run_drills(image)
    elif args.soak_seconds > 0:
        soak(image, max(args.clients), args.soak_seconds, args.workers, args.sample_every,
             args.max_requests)
    else:
        load_runs(image, args.clients, args.seconds, args.workers, args.max_requests)


if __name__ == "__main__":
    main()
