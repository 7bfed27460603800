"""Grad-CAM and OOD-guard cost per image, in-process on the shipped model (medians, ms).

    uv run python benchmarks/explain.py            # 50 repetitions on a real MRI if found
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.serving import default_image  # noqa: E402
from brainmri.config import DEFAULTS  # noqa: E402
from brainmri.inference import default_model_path  # noqa: E402


def main() -> None:
    """Time predict_checked (forward + guard) and explain (Grad-CAM) on one image."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=default_model_path(Path(DEFAULTS["BRAINMRI_MODEL_DIR"])))
    parser.add_argument("-n", type=int, default=50)
    args = parser.parse_args()
    from brainmri.inference import overlay_data_uri
    from brainmri.inference import Predictor

    predictor = Predictor.from_path(args.model)
    predictor.load()
    data = default_image()
    scan = predictor.prepare_scan(data)
    image = scan.model_input
    timings: dict[str, list[float]] = {"predict (no guard)": [], "predict_checked (forward + OOD guard)": [],
                                       "Grad-CAM (explain)": [], "heatmap overlay PNG": []}
    for _ in range(args.n):
        for name, call in (("predict (no guard)", lambda: predictor.predict(image)),
                           ("predict_checked (forward + OOD guard)", lambda: predictor.predict_checked(image, scan.colourfulness)),
                           ("Grad-CAM (explain)", lambda: predictor.explain(image, "glioma"))):
            started = time.perf_counter()
            result = call()
            timings[name].append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        overlay_data_uri(result.heatmap)
        timings["heatmap overlay PNG"].append((time.perf_counter() - started) * 1000)
    for name, values in timings.items():
        print(f"{name:>40}: median {statistics.median(values):6.2f} ms  "
              f"p90 {sorted(values)[int(0.9 * len(values)) - 1]:6.2f} ms  (n={len(values)})")


if __name__ == "__main__":
    main()
