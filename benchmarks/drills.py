"""Fault drills against a real gunicorn: each returns what happened, for load.py and the tests.

- kill_worker: kill -9 one worker under load; only requests already in flight may fail.
- sigterm_master: SIGTERM the master with requests in flight; they finish, then exit 0.
- bad_model: start on a missing, corrupt or unloadable model; exit non-zero, never listen.
- big_uploads: 20 concurrent ~20 MB uploads; no 5xx, worker memory stays bounded.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from benchmarks.harness import GunicornServer
from benchmarks.harness import Outcome
from benchmarks.harness import get_status
from benchmarks.harness import multipart
from benchmarks.harness import rss_mib
from benchmarks.harness import run_load
from benchmarks.harness import serving

__all__ = ["big_jpeg", "big_uploads", "bad_model", "kill_worker", "sigterm_master"]


def kill_worker(image: bytes, clients: int = 4, after_respawn_s: float = 10.0,
                timeout_s: float = 240.0) -> dict[str, Any]:
    """kill -9 one of two workers 3 s into a load run; run on until a new worker is ready."""
    body, content_type = multipart(image)
    with serving(workers=2) as server:
        before = server.ready_pids()
        victim = min(before)
        state: dict[str, float] = {}

        def during(elapsed: float) -> bool:
            if "killed" not in state and elapsed >= 3.0:
                os.kill(victim, signal.SIGKILL)
                state["killed"] = time.perf_counter()
            if "killed" in state and "respawned" not in state and server.ready_pids() - before:
                state["respawned"] = time.perf_counter()
            return "respawned" in state and time.perf_counter() - state["respawned"] > after_respawn_s

        load = run_load(server.port, body, content_type, clients, timeout_s, during=during)
        killed = state["killed"]
        failed = load.errors
        return {
            "requests": len(load.outcomes),
            "failed": len(failed),
            # A request that failed but was sent after the kill would mean clients kept
            # reaching a dead worker: the drill's real check.
            "failed_started_after_kill": sum(o.started > killed for o in failed),
            "failed_in_flight": sum(o.started <= killed for o in failed),
            "respawn_s": round(state["respawned"] - killed, 1) if "respawned" in state else None,
            "ok_after_respawn": sum(o.status == 200 and o.started > state.get("respawned", 1e18)
                                    for o in load.outcomes),
            "workers_after": len(server.ready_pids()),
        }


def sigterm_master(image: bytes, in_flight: int = 4, files_per_request: int = 64) -> dict[str, Any]:
    """SIGTERM the master while `in_flight` slow batch requests run; they must all finish."""
    boundary = "drillboundary"
    parts = b"".join(
        (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"s{i}.jpg\""
         "\r\nContent-Type: image/jpeg\r\n\r\n").encode() + image + b"\r\n"
        for i in range(files_per_request))
    body = parts + f"--{boundary}--\r\n".encode()
    content_type = f"multipart/form-data; boundary={boundary}"
    # Batches of 64 take seconds to classify, so every request is surely mid-flight at SIGTERM.
    with serving({"FLASK_BRAINMRI_BATCH_MAX_FILES": str(files_per_request)}, workers=2) as server:
        outcomes: list[Outcome] = []
        lock = threading.Lock()

        def send() -> None:
            import http.client

            started = time.perf_counter()
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
            try:
                conn.request("POST", "/api/v1/predict/batch", body, {"Content-Type": content_type})
                response = conn.getresponse()
                response.read()
                status = response.status
            except OSError:
                status = None
            finally:
                conn.close()  # an unclosed socket is a ResourceWarning, an error in the tests
            ended = time.perf_counter()
            with lock:
                outcomes.append(Outcome(status, (ended - started) * 1e3, ended, started))

        threads = [threading.Thread(target=send) for _ in range(in_flight)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)  # the requests are uploaded and being classified
        sent = time.perf_counter()
        server.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(150)
        code = server.wait_exit(60)
        exited = time.perf_counter()
        return {
            "in_flight": in_flight,
            "completed_200": sum(o.status == 200 for o in outcomes),
            "finished_after_sigterm": sum(o.ended > sent for o in outcomes),
            "exit_code": code,
            "exit_s": round(exited - sent, 1),
            "listening_after": get_status(server.port, "/healthz") is not None,
        }


def bad_model(kind: str, source_dir: Path, work_dir: Path, timeout_s: float = 150.0) -> dict[str, Any]:
    """Start gunicorn on a model folder with one broken model: `missing`, `corrupt`, `unloadable`.

    `missing`: the folder holds no model. `corrupt`: the .h5 is truncated (sha256 mismatch).
    `unloadable`: the .h5 is garbage but its metadata was re-stamped to match (the sha256
    check passes, Keras fails).
    """
    from brainmri.inference import metadata_path_for
    from brainmri.inference import write_model_card

    model_dir = Path(work_dir) / f"models-{kind}"
    model_dir.mkdir(parents=True)
    model = Path(source_dir) / "brainmri_cnn.h5"
    if kind != "missing":
        for path in (model, metadata_path_for(model)):
            shutil.copy(path, model_dir / path.name)
        target = model_dir / model.name
        if kind == "corrupt":
            target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
        elif kind == "unloadable":
            import json

            target.write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(4096))
            meta = json.loads(metadata_path_for(target).read_text())
            write_model_card(target, meta)  # re-stamps the sha256 of the garbage
        else:
            raise ValueError(f"unknown drill kind {kind!r}")
    with GunicornServer({"FLASK_BRAINMRI_MODEL_DIR": str(model_dir)}, workers=2) as server:
        started = time.perf_counter()
        code = server.wait_exit(timeout_s)
        listening = get_status(server.port, "/healthz") is not None
        log = server.log
    message = next((line for line in log.splitlines() if "BrainMRI cannot start" in line), "")
    return {"kind": kind, "exit_code": code, "exit_s": round(time.perf_counter() - started, 1),
            "listening_after": listening, "workers_booted": log.count("Booting worker"),
            "message": message.split("BrainMRI cannot start: ")[-1]}


def big_jpeg(mri: bytes, target_bytes: int = 19_500_000, seed: int = 0) -> bytes:
    """The MRI slice `mri` enlarged, with fine noise (incompressible), as a ~`target_bytes` JPEG."""
    rng = np.random.default_rng(seed)
    grey = cv2.imdecode(np.frombuffer(mri, np.uint8), cv2.IMREAD_GRAYSCALE)
    side = 3000
    while True:
        image = cv2.resize(grey, (side, side), interpolation=cv2.INTER_CUBIC).astype(np.float32)
        noisy = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
        data = cv2.imencode(".jpg", noisy, [cv2.IMWRITE_JPEG_QUALITY, 100])[1].tobytes()
        if len(data) >= target_bytes * 0.95 or side > 8000:
            return data
        side = int(side * (target_bytes / len(data)) ** 0.5 * 1.02)


def big_uploads(mri: bytes, concurrent: int = 20, target_bytes: int = 19_500_000) -> dict[str, Any]:
    """`concurrent` uploads of ~20 MB (the MRI `mri` enlarged) at once; statuses and worker RSS."""
    image = big_jpeg(mri, target_bytes)
    body, content_type = multipart(image)
    with serving(workers=2) as server:
        pids = sorted(server.ready_pids())
        before = {pid: round(rss_mib(pid)) for pid in pids}
        load = run_load(server.port, body, content_type, concurrent, 300.0,
                        max_requests=concurrent)
        after = {pid: round(rss_mib(pid)) for pid in pids}
        peak = {pid: round(rss_mib(pid, peak=True)) for pid in pids}
        statuses: dict[str, int] = {}
        for outcome in load.outcomes:
            statuses[str(outcome.status)] = statuses.get(str(outcome.status), 0) + 1
        return {"uploads": len(load.outcomes), "upload_mb": round(len(image) / 1e6, 1),
                "statuses": statuses, "seconds": round(load.seconds, 1),
                "rss_before_mib": before, "rss_after_mib": after, "rss_peak_mib": peak,
                "server_alive": server.process.poll() is None and len(server.ready_pids()) == 2}
