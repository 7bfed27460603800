"""Study latency (issue 34): a 155-slice 240x240 NIfTI volume through POST /api/v1/studies,
end to end in-process, split into reading (decode, window, blank check, preprocessing) and
screening (batched forward pass, guard, calibration); plus decode+preprocessing per slice and the
single-slice API's p50 at one client (in-process Flask test client: no HTTP or gunicorn cost).

The machine is shared: report medians, and compare only runs made together.

    uv run --locked python benchmarks/study_volume.py
    uv run --locked python benchmarks/study_volume.py --runs 5 --single 100
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data"
VOLUME = DATA / "volumes" / "Brats18_TCIA02_471_flair.nii.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volume", type=Path, default=VOLUME)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--single", type=int, default=60, help="single-slice requests to time")
    args = parser.parse_args()

    from brainmri import create_app
    from brainmri.imaging import read_scan
    from brainmri.imaging import read_study
    from brainmri.inference import screen_study
    from brainmri.web import uploads

    app = create_app({"TESTING": True, "SECRET_KEY": "benchmark", "BRAINMRI_RATE_LIMIT": None})
    client = app.test_client()
    volume = args.volume.read_bytes()

    def post_volume():
        return client.post("/api/v1/studies",
                           data={"files": [(io.BytesIO(volume), args.volume.name)]},
                           content_type="multipart/form-data")

    started = time.perf_counter()
    first = post_volume()
    assert first.status_code == 200, first.get_json()
    cold = time.perf_counter() - started
    body = first.get_json()
    totals = []
    for _ in range(args.runs):
        started = time.perf_counter()
        assert post_volume().status_code == 200
        totals.append(time.perf_counter() - started)

    with app.test_request_context():
        predictor = uploads.current_predictor()
        threshold = uploads.uncertain_below(predictor)
    reads, screens = [], []
    for _ in range(args.runs):
        started = time.perf_counter()
        study = read_study([("v.nii.gz", volume)], predictor.input_size)
        reads.append(time.perf_counter() - started)
        started = time.perf_counter()
        screen_study(predictor, study, threshold)
        screens.append(time.perf_counter() - started)

    slices = sorted((DATA / "lgg" / "glioma").glob("*_flair.jpg"))[:100]
    per_slice = []
    for path in slices:
        data = path.read_bytes()
        started = time.perf_counter()
        read_scan(data, predictor.input_size)
        per_slice.append((time.perf_counter() - started) * 1000)

    single = []
    data = slices[0].read_bytes()
    for i in range(args.single + 5):
        started = time.perf_counter()
        response = client.post("/api/v1/predict", data={"file": (io.BytesIO(data), "a.jpg")},
                               content_type="multipart/form-data")
        elapsed = (time.perf_counter() - started) * 1000
        assert response.status_code in (200, 422)
        if i >= 5:
            single.append(elapsed)

    import os

    report = {
        "load_average_1min": round(os.getloadavg()[0], 2),
        "model": body["model"]["name"],
        "engine": predictor.engine,
        "volume_slices": len(body["slices"]),
        "volume_blank": body["summary"]["counts"]["blank"],
        "volume_refused": body["summary"]["counts"]["refused"],
        "volume_summary": {k: body["summary"][k] for k in ("tumor_probability", "label",
                                                           "most_suspicious")},
        "volume_first_request_s": round(cold, 3),
        "volume_request_s_median": round(statistics.median(totals), 3),
        "volume_request_s_all": [round(t, 3) for t in totals],
        "read_study_s_median": round(statistics.median(reads), 3),
        "screen_study_s_median": round(statistics.median(screens), 3),
        "decode_preprocess_ms_per_slice_median": round(statistics.median(per_slice), 2),
        "decode_preprocess_ms_per_slice_mean": round(statistics.mean(per_slice), 2),
        "single_slice_api_ms_p50": round(statistics.median(single), 2),
        "single_slice_api_ms_p90": round(sorted(single)[int(0.9 * len(single))], 2),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
