"""Batch scoring: `brainmri predict --engine plain` against `--engine ray` on the same files.

Each run is the real command in a fresh process (Ray's start-up, the workers' TensorFlow import
and model load included, as a user would see them), on the same first N LGG slices, the same
model copy and the same --batch-size. The two CSVs must be identical. With several sizes the
fixed cost and the per-file cost of each engine are fitted (least squares on seconds = fixed +
N · per_file), which says from how many files on, if ever, Ray wins on this machine.

    uv run python benchmarks/ray_batch.py                      # 3000 files, both engines
    uv run python benchmarks/ray_batch.py --files 64 256       # a small subset (busy CPU)
    uv run python benchmarks/ray_batch.py --address auto       # a running Ray cluster
    uv run python benchmarks/ray_batch.py --no-guard           # both engines without the guard

Bounded: each run has --timeout seconds; the working files are symlinks in a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from brainmri.inference.export import snapshot_model  # noqa: E402

LGG = Path(os.environ.get("BRAINMRI_LGG", ROOT.parent / "shared" / "data" / "lgg"))
BRAINMRI = Path(sys.executable).parent / "brainmri"  # the console script of this environment


def lgg_slices(count: int) -> list[Path]:
    """The first `count` LGG slices, glioma and no-tumour interleaved (sorted, reproducible)."""
    glioma = sorted((LGG / "glioma").glob("*.jpg"))
    healthy = sorted((LGG / "no_tumor").glob("*.jpg"))
    mixed = [path for pair in zip(glioma, healthy) for path in pair]
    mixed += glioma[len(healthy):] + healthy[len(glioma):]
    if len(mixed) < count:
        raise SystemExit(f"only {len(mixed)} LGG slices under {LGG}")
    return mixed[:count]


def run(engine: str, folder: Path, model: Path, out: Path, batch_size: int,
        address: str | None, timeout: float, extra: list[str]) -> float:
    """Wall seconds of one `brainmri predict` run (raises if it fails or times out)."""
    command = [str(BRAINMRI), "predict", str(folder), "--csv", str(out), "--model", str(model),
               "--batch-size", str(batch_size), "--engine", engine, *extra]
    if address and engine == "ray":
        command += ["--address", address]
    started = time.perf_counter()
    subprocess.run(command, check=True, timeout=timeout, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def fit(sizes: list[int], seconds: list[float]) -> tuple[float, float]:
    """(fixed seconds, seconds per file) from a least-squares line; per-file only for one size."""
    if len(sizes) < 2:
        return float("nan"), seconds[0] / sizes[0]
    per_file, fixed = np.polyfit(np.asarray(sizes, float), np.asarray(seconds, float), 1)
    return float(fixed), float(per_file)


def main() -> None:
    """Run both engines on each size and print the table and the break-even point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, nargs="+", default=[3000])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model", type=Path, default=ROOT / "model" / "brainmri_cnn.h5")
    parser.add_argument("--address", default=None, help="Ray cluster for the ray engine")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    parser.add_argument("--repeat", type=int, default=2,
                        help="runs per engine and size; the fastest counts (a shared machine)")
    parser.add_argument("--no-guard", action="store_true",
                        help="pass --no-guard to both engines (a model whose guard cannot run)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="brainmri-raybench-") as tmp:
        tmp_path = Path(tmp)
        model = snapshot_model(args.model, tmp_path)  # both engines, one model
        times: dict[str, list[float]] = {"plain": [], "ray": []}
        print(f"{'files':>6} {'engine':>6} {'seconds':>8} {'files/s':>8}  CSV")
        for count in args.files:
            folder = tmp_path / f"files{count}"
            folder.mkdir()
            for index, source in enumerate(lgg_slices(count)):
                (folder / f"{index:05d}_{source.name}").symlink_to(source)
            csvs = {}
            for engine in ("plain", "ray"):
                csvs[engine] = tmp_path / f"{engine}{count}.csv"
                # The first run also pays for cold file and import caches; the fastest counts.
                seconds = min(run(engine, folder, model, csvs[engine], args.batch_size,
                                  args.address, args.timeout,
                                  ["--no-guard"] if args.no_guard else [])
                              for _ in range(max(1, args.repeat)))
                times[engine].append(seconds)
                same = "" if engine == "plain" else (
                    "identical" if csvs["ray"].read_bytes() == csvs["plain"].read_bytes()
                    else "DIFFERENT")
                print(f"{count:>6} {engine:>6} {seconds:8.1f} {count / seconds:8.1f}  {same}",
                      flush=True)
        lines = {engine: fit(args.files, values) for engine, values in times.items()}
        for engine, (fixed, per_file) in lines.items():
            print(f"{engine}: fixed {fixed:.1f} s + {per_file * 1000:.1f} ms per file")
        if len(args.files) < 2:
            return
        (fixed_p, per_p), (fixed_r, per_r) = lines["plain"], lines["ray"]
        # A lower bound that needs no Ray slope: Ray cannot win before the plain engine takes
        # as long as Ray's shortest run. (While the files are few, Ray's tasks finish during its
        # own start-up, so its fitted per-file cost is close to 0 and says little.)
        floor = (min(times["ray"]) - fixed_p) / per_p if per_p > 0 else float("inf")
        print(f"The plain engine takes Ray's shortest run ({min(times['ray']):.0f} s) at about "
              f"{floor:.0f} files: below that Ray cannot pay off here")
        if 0 < per_r < per_p:
            print(f"Fitted break-even: about {(fixed_r - fixed_p) / (per_p - per_r):.0f} files "
                  "(trust it once Ray's runs grow with the file count)")


if __name__ == "__main__":
    main()
