"""benchmarks/peer.py's plumbing, on stand-in packages: nothing is downloaded, nothing is timed.

The real run installs detect-tumor from PyPI (benchmarks/peer.py); here the worker meets a
fake `detect_tumor` on PYTHONPATH: one without weights (it must stop with a clear message) and
one with a tiny ONNX model (the protocol, the thread pinning and the closed network).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks import peer

WORKER = peer.WORKER

FAKE_DETECTOR = '''
import socket
from pathlib import Path

import numpy as np
import onnxruntime as ort


class Result:
    def __init__(self, label):
        self.predicted_class = label


class TumorDetector:
    def __init__(self, model_path=None, providers=None):
        self._model_path = None
        self._session = None

    def _ensure_session(self):
        if self._session is None:
            path = Path(__file__).parent / "models" / "tiny.onnx"
            self._session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return self._session, self._session.get_inputs()[0].name, {0: "glioma"}

    def predict(self, image):
        if image == b"download":
            socket.create_connection(("example.org", 443))
        session, name, _ = self._ensure_session()
        session.run(None, {name: np.zeros((1, 2), np.float32)})
        return Result("notumor")
'''


def fake_package(root: Path, weights: bool) -> Path:
    """A `detect_tumor` under `root`, with a 2-in, 2-out ONNX model in models/ when `weights`."""
    package = root / "detect_tumor"
    (package / "models").mkdir(parents=True)
    if not weights:
        (package / "__init__.py").write_text(
            'URL = "https://example.org/vgg16.onnx"  # fetched on first use\n')
        return root
    import onnx
    from onnx import TensorProto
    from onnx import helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, package / "models" / "tiny.onnx")
    (package / "__init__.py").write_text(FAKE_DETECTOR)
    (package / "preprocess.py").write_text(
        "import numpy as np\n\ndef preprocess(data):\n    return np.zeros((1, 2), np.float32)\n")
    return root


def start_worker(root: Path, threads: int = 1) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(root), "PEER_THREADS": str(threads)}
    return subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_a_peer_without_weights_stops_with_a_clear_message(tmp_path):
    """No model file in the package: a no_weights answer naming the download, and exit 3."""
    worker = start_worker(fake_package(tmp_path, weights=False))
    out, _ = worker.communicate(timeout=60)
    answer = json.loads(out.splitlines()[0])
    assert worker.returncode == 3
    assert answer["ok"] is False and answer["code"] == "no_weights"
    assert "cannot be run offline" in answer["detail"]
    assert "https://example.org/vgg16.onnx" in answer["detail"]


def test_the_worker_pins_threads_and_closes_the_network(tmp_path):
    """Ready facts name the shipped weights and the pinned threads; a connection attempt fails."""
    root = fake_package(tmp_path, weights=True)
    image = tmp_path / "scan.jpg"
    image.write_bytes(b"not really a jpeg")
    download = tmp_path / "download.jpg"
    download.write_bytes(b"download")
    worker = start_worker(root, threads=2)
    try:
        ready = json.loads(worker.stdout.readline())
        assert ready["ok"] is True
        assert [w["file"] for w in ready["weights"]] == ["models/tiny.onnx"]
        assert ready["intra_op_threads"] == 2 and ready["inter_op_threads"] == 1
        assert ready["session_loaded"] is True

        worker.stdin.write(json.dumps({"cmd": "classify",
                                       "paths": [str(image), str(download)]}) + "\n")
        worker.stdin.flush()
        result = json.loads(worker.stdout.readline())
        assert result["labels"] == ["notumor", "error:OSError"]
        assert len(result["ms"]) == 2

        worker.stdin.write(json.dumps({"cmd": "forward", "path": str(image), "repeats": 2}) + "\n")
        worker.stdin.flush()
        forward = json.loads(worker.stdout.readline())
        assert forward["input"] == [1, 2] and len(forward["forward_ms"]) == 2
        worker.stdin.write('{"cmd": "quit"}\n')
        worker.stdin.flush()
        assert worker.wait(timeout=60) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
        worker.communicate()  # closes the pipes


def test_images_interleave_classes_and_the_sanity_line_maps_names(tmp_path, monkeypatch):
    """SARTAJ-style folders are taken class by class in turn; peer names map onto ours."""
    for folder in ("glioma_tumor", "no_tumor"):
        (tmp_path / "Testing" / folder).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "Testing" / folder / f"{folder}_{i}.jpg").write_bytes(b"")
    monkeypatch.setattr(peer, "DATA", tmp_path)
    paths = peer.pick_images(None, 4)
    assert [peer.truth(path) for path in paths] == ["glioma", "no_tumor", "glioma", "no_tumor"]
    line = peer.sanity(paths, ["glioma", "no_tumor", "refused:not_brain_mri", "no_tumor"],
                       ["glioma", "notumor", "glioma", "glioma"])
    assert line == ("folder label matched: ours 3/4, peer 3/4; the two agree on 2/4; "
                    "ours refused 1")
    assert len(peer.pick_images(tmp_path / "Testing" / "no_tumor", 10)) == 3
    assert np.isfinite(peer.p([1.0, 2.0], 90))
