"""Peer benchmark: BrainMRI against detect-tumor (PyPI; VGG16 on ONNX Runtime), same files and CPUs.

The peer is pip-installed from PyPI into a throwaway venv (`.bench/peer-venv`, gitignored, reused
between runs; `--fresh` rebuilds it) and runs in a subprocess there (benchmarks/peer_worker.py,
which closes the network before importing it: its weights must ship in the wheel). BrainMRI runs
in this process through its served path: the file's bytes into `inference.classify_one` (decode,
preprocess, one forward pass, the out-of-distribution guard, temperature calibration, the
"uncertain" flag: what the API does per file) on the default model of `model/`, with whatever
engine the public API loads. Both sides are pinned to the same CPUs and thread count, load and
warm up first (reported apart), then classify the same files end to end (read from disk to
answer), taking turns in blocks of a few images (which side goes first alternates), so both meet
the same background load; several repeats. Prints per-image medians and p90s, the ratio of
medians and the median per-image ratio (the machine is shared and noisy: compare ratios, not
single runs), then batch-of-1 preprocessing and forward-only times: where the time goes.

    uv run python benchmarks/peer.py                          # 100 SARTAJ Testing slices, 1 thread
    uv run python benchmarks/peer.py --threads 2 --repeats 5
    uv run python benchmarks/peer.py --images DIR --n 50 --fresh
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DATA = Path(os.environ.get("BRAINMRI_DATA", ROOT.parent / "shared" / "data" / "sartaj"))
VENV = ROOT / ".bench" / "peer-venv"
WORKER = Path(__file__).resolve().parent / "peer_worker.py"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
# The peer's class names -> ours; the SARTAJ folder names -> ours (for the sanity check only).
PEER_CLASSES = {"glioma": "glioma", "meningioma": "meningioma", "notumor": "no_tumor",
                "pituitary": "pituitary"}
FOLDER_CLASSES = {"glioma_tumor": "glioma", "meningioma_tumor": "meningioma",
                  "no_tumor": "no_tumor", "pituitary_tumor": "pituitary", "notumor": "no_tumor",
                  "glioma": "glioma", "meningioma": "meningioma", "pituitary": "pituitary"}


def pick_images(folder: Path | None, count: int) -> list[Path]:
    """`count` images from `folder` (sorted, recursive), else SARTAJ Testing, classes in turn."""
    if folder is not None:
        found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        testing = DATA / "Testing"
        by_class = [sorted(d.glob("*.jpg")) for d in sorted(testing.iterdir()) if d.is_dir()] \
            if testing.is_dir() else []
        found = [path for row in zip(*by_class) for path in row] if by_class else []
        leftover = [p for paths in by_class for p in paths if p not in set(found)]
        found += sorted(leftover)
        folder = testing
    if not found:
        raise SystemExit(f"no images under {folder} (set BRAINMRI_DATA or pass --images DIR)")
    return found[:count]


def truth(path: Path) -> str | None:
    """The class a file's folder names, if it names one."""
    return FOLDER_CLASSES.get(path.parent.name)


def pin_cpus(threads: int) -> list[int]:
    """Restrict this process (and so its children) to `threads` CPUs; TF, OpenMP likewise."""
    available = sorted(os.sched_getaffinity(0))
    if threads > len(available):
        raise SystemExit(f"--threads {threads}: only {len(available)} CPUs are available")
    cpus = available[:threads]
    os.sched_setaffinity(0, cpus)
    # Before TensorFlow initialises (tensorflow#57812); the same values gunicorn.conf.py sets.
    os.environ["TF_NUM_INTRAOP_THREADS"] = str(threads)
    os.environ["TF_NUM_INTEROP_THREADS"] = "1"
    os.environ["OMP_NUM_THREADS"] = str(threads)
    return cpus


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_peer_venv(venv: Path, spec: str, fresh: bool) -> Path:
    """The venv's python with `spec` installed from PyPI (reused unless `fresh` or spec changed)."""
    python = venv_python(venv)
    marker = venv / ".peer-spec"
    if fresh and venv.exists():
        shutil.rmtree(venv)
    usable = python.exists() and marker.is_file() and marker.read_text() == spec
    if usable:
        probe = subprocess.run([python, "-c", "import detect_tumor"], capture_output=True)
        usable = probe.returncode == 0
    if usable:
        print(f"peer venv: {venv} (reused; --fresh rebuilds it)")
        return python
    started = time.perf_counter()
    if not python.exists():
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    install = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", spec]
    print(f"peer venv: {venv}: {' '.join(install[2:])}", flush=True)
    done = subprocess.run(install)
    if done.returncode != 0:
        raise SystemExit(f"pip could not install {spec!r} from PyPI into {venv} "
                         f"(exit {done.returncode}); see pip's message above.")
    marker.write_text(spec)
    print(f"peer venv: installed in {time.perf_counter() - started:.0f} s")
    return python


class Peer:
    """detect-tumor in its venv, in a subprocess pinned to this process's CPUs."""

    def __init__(self, python: Path, threads: int) -> None:
        env = {**os.environ, "PEER_THREADS": str(threads), "PYTHONNOUSERSITE": "1"}
        env.pop("PYTHONPATH", None)
        env.pop("VIRTUAL_ENV", None)
        self.started = time.perf_counter()
        self.process = subprocess.Popen([str(python), str(WORKER)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env,
                                        cwd=python.parent)
        self.facts = self._read()
        self.ready_s = time.perf_counter() - self.started
        if not self.facts.get("ok"):
            self.process.wait(30)
            raise SystemExit(f"the peer cannot be benchmarked ({self.facts.get('code')}): "
                             f"{self.facts.get('detail')}")

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait(30)
            raise SystemExit(f"the peer worker exited ({code}) without answering; "
                             "its error is above")
        return json.loads(line)

    def ask(self, **command) -> dict:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write('{"cmd": "quit"}\n')
                self.process.stdin.close()
                self.process.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait(10)


def describe_engine(predictor) -> str:
    """Which engine the served predictor runs, as far as its public face and sys.modules tell."""
    runtimes = []
    for module in ("tensorflow", "keras", "onnxruntime"):
        if module in sys.modules:
            runtimes.append(f"{module} {getattr(sys.modules[module], '__version__', '?')}")
    guard = getattr(getattr(predictor, "guard", None), "network", None)
    guard_engine = getattr(guard, "engine", None)
    switches = {k: v for k, v in os.environ.items() if k.startswith("BRAINMRI_ENGINE")
                or k.startswith("FLASK_BRAINMRI_ENGINE")}
    parts = [f"engine {predictor.engine}",
             "loaded: " + (", ".join(runtimes) or "none of tensorflow/keras/onnxruntime")]
    if guard_engine:
        parts.append(f"guard network on {guard_engine}")
    if switches:
        parts.append("switches: " + ", ".join(f"{k}={v}" for k, v in switches.items()))
    return "; ".join(parts)


def load_ours(model_name: str | None):
    """The default model of model/ (or `model_name`), loaded and warmed up as a worker does."""
    started = time.perf_counter()
    from brainmri.config import DEFAULTS
    from brainmri.inference import ModelRegistry
    from brainmri.inference import default_model_path
    from brainmri.inference import discover_models
    from brainmri.inference import uncertain_threshold

    model_dir = Path(DEFAULTS["BRAINMRI_MODEL_DIR"])
    preferred = model_name or os.environ.get("FLASK_BRAINMRI_DEFAULT_MODEL") \
        or DEFAULTS["BRAINMRI_DEFAULT_MODEL"]
    default = default_model_path(model_dir, preferred)
    # Only the model that answers: the other served models cost load time, not per-file time.
    paths = [path for path in discover_models(model_dir) if path == default]
    registry = ModelRegistry.from_paths(paths, default, DEFAULTS["BRAINMRI_MAX_PIXELS"])
    predictor = registry.get()
    checked = time.perf_counter()
    registry.load()
    loaded = time.perf_counter()
    guard = predictor.guard  # loaded on first use otherwise: count it as load, not as a request
    guarded = time.perf_counter()
    threshold = uncertain_threshold(predictor, DEFAULTS["BRAINMRI_UNCERTAIN_BELOW"])
    times = {"metadata_s": checked - started, "load_s": loaded - checked,
             "guard_s": guarded - loaded, "guard": guard is not None}
    return predictor, threshold, times


def classify_ours(predictor, threshold: float, paths: list[Path]) -> dict:
    """End to end per file, as the API does it: read the bytes, `classify_one`, an answer."""
    from brainmri.imaging import ImageError
    from brainmri.inference import classify_one

    times, labels = [], []
    for path in paths:
        started = time.perf_counter()
        try:
            label = classify_one(predictor, path.read_bytes(), threshold)[0].label
        except ImageError as error:  # a refusal (not brain MRI) or an unusable file: an answer
            label = f"refused:{getattr(error, 'code', type(error).__name__)}"
        times.append((time.perf_counter() - started) * 1e3)
        labels.append(label)
    return {"ms": times, "labels": labels}


def forward_ours(predictor, path: Path, repeats: int) -> dict:
    """Batch-of-1 decode+preprocess and forward-only times on one file (what classify_one runs)."""
    data = path.read_bytes()
    scan = predictor.prepare_scan(data)
    run = predictor.forward
    batch = np.asarray(scan.model_input, np.float32)[None, ...]
    run(batch)
    prep, fwd = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        scan = predictor.prepare_scan(data)
        middle = time.perf_counter()
        run(np.asarray(scan.model_input, np.float32)[None, ...])
        ended = time.perf_counter()
        prep.append((middle - started) * 1e3)
        fwd.append((ended - middle) * 1e3)
    return {"preprocess_ms": prep, "forward_ms": fwd, "input": list(batch.shape)}


def p(values, q: float) -> float:
    return float(np.percentile(values, q))


def line(name: str, values: list[float]) -> str:
    return (f"{name:>26}: median {p(values, 50):8.2f} ms  p90 {p(values, 90):8.2f} ms  "
            f"({len(values)} samples)")


def sanity(paths: list[Path], ours: list[str], peer: list[str]) -> str:
    """Top-1 against the folder label, and agreement: a check that both answer, not a score."""
    peer = [PEER_CLASSES.get(label, label) for label in peer]
    truths = [truth(path) for path in paths]
    labelled = [i for i, t in enumerate(truths) if t is not None]
    refused = sum(label.startswith("refused:") for label in ours)
    agree = sum(a == b for a, b in zip(ours, peer))
    text = f"the two agree on {agree}/{len(paths)}; ours refused {refused}"
    if labelled:
        hit_ours = sum(ours[i] == truths[i] for i in labelled)
        hit_peer = sum(peer[i] == truths[i] for i in labelled)
        text = (f"folder label matched: ours {hit_ours}/{len(labelled)}, peer "
                f"{hit_peer}/{len(labelled)}; " + text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100, help="images (default 100)")
    parser.add_argument("--images", type=Path, help="a folder of JPEG/PNG slices instead of SARTAJ")
    parser.add_argument("--threads", type=int, default=1, help="CPUs and threads for both sides")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the images per side")
    parser.add_argument("--block", type=int, default=10,
                        help="images per turn; the side that goes first alternates per block")
    parser.add_argument("--warmup", type=int, default=5, help="untimed images per side first")
    parser.add_argument("--forward-repeats", type=int, default=30)
    parser.add_argument("--model", help="one of BrainMRI's served models (default: the default)")
    parser.add_argument("--peer", default="detect-tumor", help="pip spec (detect-tumor==0.1.1)")
    parser.add_argument("--venv", type=Path, default=VENV)
    parser.add_argument("--fresh", action="store_true", help="rebuild the peer venv")
    args = parser.parse_args()

    cpus = pin_cpus(args.threads)
    load_before = os.getloadavg()
    paths = pick_images(args.images, args.n)
    print(f"images: {len(paths)} from {paths[0].parent.parent}; CPUs {cpus} "
          f"({args.threads} thread(s) per side) of {os.cpu_count()}; load average "
          f"{load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")

    python = ensure_peer_venv(args.venv, args.peer, args.fresh)
    peer = Peer(python, args.threads)
    try:
        f = peer.facts
        weights = ", ".join(f"{w['file']} ({w['bytes'] / 2**20:.1f} MiB)" for w in f["weights"])
        print(f"peer:  detect-tumor {f['version']} (python {f['python']}, onnxruntime "
              f"{f['onnxruntime']}, numpy {f['numpy']}); weights in the wheel: {weights}; "
              f"loaded from {f['model_path']} with the network closed")
        print(f"       onnxruntime intra-op threads {f.get('intra_op_threads', '?')}, inter-op "
              f"{f.get('inter_op_threads', '?')}, {f.get('providers', '?')}, input "
              f"{f.get('input_shape', '?')}")
        print(f"       start to ready {peer.ready_s:.2f} s (import {f['import_s']:.2f} s, "
              f"session {f['load_s']:.2f} s"
              f"{'' if f['session_loaded'] else ', session built by the first predict'})")

        predictor, threshold, times = load_ours(args.model)
        card = predictor.card
        print(f"ours:  {card.name} {card.raw.get('version', '')} ({card.model_path.name}, sha256 "
              f"{card.raw.get('sha256', '')[:12]}, input {card.input_size}² × {card.channels}); "
              f"{describe_engine(predictor)}")
        print(f"       metadata + sha256 {times['metadata_s']:.2f} s, load + warm-up "
              f"{times['load_s']:.2f} s (engine import included), guard "
              f"{times['guard_s']:.2f} s{'' if times['guard'] else ' (no guard fitted)'}; "
              f"uncertain below {threshold:.3f}")

        warm = paths[:args.warmup]
        first_peer = peer.ask(cmd="classify", paths=[str(x) for x in warm])["ms"]
        first_ours = classify_ours(predictor, threshold, warm)["ms"]
        print(f"warm-up ({len(warm)} images): first call peer {first_peer[0]:.1f} ms, "
              f"ours {first_ours[0]:.1f} ms")

        peer_ms, ours_ms, per_repeat = [], [], []
        for repeat in range(args.repeats):
            run_peer, run_ours, peer_labels, ours_labels = [], [], [], []
            # Blocks of a few images, the side that goes first alternating: both sides meet the
            # same background load, so each block's pair of times is a fair comparison.
            for block, start in enumerate(range(0, len(paths), args.block)):
                chunk = paths[start:start + args.block]
                for side in (("peer", "ours") if (repeat + block) % 2 == 0 else ("ours", "peer")):
                    if side == "peer":
                        done = peer.ask(cmd="classify", paths=[str(x) for x in chunk])
                        run_peer += done["ms"]
                        peer_labels += done["labels"]
                    else:
                        done = classify_ours(predictor, threshold, chunk)
                        run_ours += done["ms"]
                        ours_labels += done["labels"]
            peer_ms += run_peer
            ours_ms += run_ours
            per_repeat.append((p(run_peer, 50), p(run_ours, 50)))
            print(f"  repeat {repeat + 1}: median peer {per_repeat[-1][0]:.1f} ms, "
                  f"ours {per_repeat[-1][1]:.1f} ms", flush=True)

        print(f"\nend to end per image (read file, decode, preprocess, forward, answer), "
              f"{len(paths)} images × {args.repeats} repeats, {args.threads} thread(s):")
        print(line("peer (detect-tumor)", peer_ms))
        print(line("ours (classify_one)", ours_ms))
        ratios = [a / b for a, b in per_repeat]
        paired = [a / b for a, b in zip(peer_ms, ours_ms)]  # same image, same block, same repeat
        print(f"{'ratio peer / ours':>26}: {p(peer_ms, 50) / p(ours_ms, 50):.1f}× (medians); "
              f"per repeat {', '.join(f'{r:.1f}×' for r in ratios)}; median of per-image "
              f"ratios {p(paired, 50):.1f}× (p10 {p(paired, 10):.1f}×, p90 {p(paired, 90):.1f}×)")
        print(f"{'throughput, one stream':>26}: peer {1e3 / p(peer_ms, 50):.1f} images/s, "
              f"ours {1e3 / p(ours_ms, 50):.1f} images/s")
        print(f"{'answers':>26}: {sanity(paths, ours_labels, peer_labels)}")

        probe = paths[0]
        peer_fwd = peer.ask(cmd="forward", path=str(probe), repeats=args.forward_repeats)
        ours_fwd = forward_ours(predictor, probe, args.forward_repeats)
        print(f"\nwhere the time goes, batch of 1 on {probe.name!r} ({args.forward_repeats} runs):")
        for name, result in (("peer", peer_fwd), ("ours", ours_fwd)):
            if "why" in result:
                print(f"{name:>26}: n/a ({result['why']})")
                continue
            print(f"{name + ' decode+preprocess':>26}: median "
                  f"{p(result['preprocess_ms'], 50):8.2f} ms   forward only "
                  f"{p(result['forward_ms'], 50):8.2f} ms   input {result['input']}")
        if "why" not in peer_fwd and "why" not in ours_fwd:
            print(f"{'forward ratio peer / ours':>26}: "
                  f"{p(peer_fwd['forward_ms'], 50) / p(ours_fwd['forward_ms'], 50):.1f}×")
    finally:
        peer.close()
    load_after = os.getloadavg()
    print(f"\nload average at the end {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f} "
          f"on {os.cpu_count()} CPUs (shared machine: compare the ratios, not the milliseconds)")


if __name__ == "__main__":
    main()
