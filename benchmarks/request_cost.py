"""Where one prediction's time goes, in process, and what micro-batching could save at most.

    uv run python benchmarks/request_cost.py                  # default model, a SARTAJ JPEG
    uv run python benchmarks/request_cost.py --engine keras   # the TensorFlow engine instead
    uv run python benchmarks/request_cost.py --image scan.png --runs 500

Stages (medians over --runs, one thread, after a warm-up): decode + preprocess (`read_scan`),
the guard's hand-made features, the guard network, the classifier's forward pass, then the
whole guarded path (`classify_one`) and the whole Flask request (test client, no socket).
Then the forward pass per image at batch sizes 1, 2, 4 and 8: what requests sharing one pass
(micro-batching, as TF Serving and Triton do) would save per request at best.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("BRAINMRI_DATA", ROOT.parent / "shared" / "data" / "sartaj"))


def timed(fn, runs: int) -> float:
    """Median milliseconds of `fn()` over `runs` calls, after 20 warm-up calls."""
    for _ in range(20):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(samples)


def default_image() -> Path:
    """A real SARTAJ test slice (the first glioma JPEG found)."""
    found = sorted(DATA.rglob("*.jpg"))
    if not found:
        sys.exit(f"no JPEG under {DATA}; pass --image or set BRAINMRI_DATA")
    return found[0]


def main() -> None:
    """Print the stage medians and the batch-size table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=None)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--engine", choices=["auto", "onnx", "keras"], default="auto")
    args = parser.parse_args()
    os.environ["BRAINMRI_ENGINE"] = args.engine
    from brainmri.preflight import quiet_tensorflow

    quiet_tensorflow()  # before anything below can bring TensorFlow in

    from brainmri import create_app
    from brainmri.imaging import read_scan
    from brainmri.inference import classify_one
    from brainmri.inference.ood import image_features
    from brainmri.web import REGISTRY_KEY

    path = args.image or default_image()
    data = path.read_bytes()
    app = create_app({"TESTING": True, "SECRET_KEY": "bench", "BRAINMRI_RATE_LIMIT": 0,
                      "BRAINMRI_CSRF_ENABLED": False})
    predictor = app.extensions[REGISTRY_KEY].get()
    predictor.load()
    guard = predictor.guard
    size = predictor.input_size
    scan = read_scan(data, size)
    x = scan.model_input[None]
    print(f"model {predictor.card.name} on the {predictor.engine} engine; {path.name} "
          f"({len(data) / 1000:.1f} kB); load average {os.getloadavg()[0]:.1f}")
    rows = [
        ("decode + preprocess (read_scan)", lambda: read_scan(data, size)),
        ("guard: hand-made features", lambda: image_features(scan.model_input, scan.colourfulness)),
    ]
    if guard is not None and guard.network is not None:
        # Both of its scores, as the guard asks for them: the forward pass and brain_distance.
        rows.append((f"guard network ({guard.network.engine}), both scores",
                     lambda: guard.network.scores(x)))
    rows += [
        ("classifier forward pass", lambda: predictor.forward(x)),
        ("guarded path (classify_one)", lambda: classify_one(predictor, data, 0.6)),
    ]
    client = app.test_client()

    def post() -> None:
        response = client.post("/api/v1/predict",
                               data={"file": (io.BytesIO(data), path.name)})
        assert response.status_code == 200, response.get_data(as_text=True)[:300]

    rows.append(("whole Flask request (test client)", post))
    for label, fn in rows:
        print(f"  {label:<36} {timed(fn, args.runs):7.2f} ms")

    print("forward pass per image by batch size (micro-batching's best case):")
    single = None
    for batch in (1, 2, 4, 8):
        inputs = np.repeat(x, batch, axis=0)
        per_image = timed(lambda: predictor.forward(inputs), max(50, args.runs // batch)) / batch
        single = single or per_image
        print(f"  batch {batch}: {per_image:6.2f} ms per image "
              f"(saves {single - per_image:5.2f} ms per request at best)")


if __name__ == "__main__":
    main()
