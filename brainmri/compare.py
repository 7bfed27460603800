"""Side-by-side comparison of trained models on identical splits: one table, one plot.

Every model is measured here, now, on the same images (not copied from each metadata file), so
the rows are comparable: the leakage-free test split, the official Testing folder and its
part with no near-copy in train/val. Models trained on different splits are refused, since
their test figures would not measure the same thing.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from .dataset import load_dataset
from .evaluation import classification_metrics
from .evaluation import eval_sets
from .evaluation import predict_canonical
from .evaluation import splits_path_for

__all__ = ["ComparisonError", "compare", "markdown_table", "single_image_latency_ms"]

SETS = ("test", "official_test", "official_test_novel")


class ComparisonError(ValueError):
    """The models cannot be compared fairly (different splits or input sizes)."""


def single_image_latency_ms(predictor, image: np.ndarray, runs: int = 50) -> float:
    """Median milliseconds of one traced forward pass on one image (after a warm-up)."""
    batch = image[None, ...]
    for _ in range(3):
        predictor.predict_arrays(batch)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        predictor.predict_arrays(batch)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _split_signature(model_path: Path) -> dict[str, list[str]]:
    manifest_path = splits_path_for(model_path)
    if not manifest_path.is_file():
        raise ComparisonError(f"{manifest_path.name} is missing: {model_path.name} cannot be "
                              "placed on the shared splits (it is written by `brainmri train`).")
    manifest = json.loads(manifest_path.read_text())
    return {name: sorted(paths) for name, paths in manifest["splits"].items()}


def compare(model_paths: list[Path], data_root: Path, out_dir: Path, cache_dir: Path | None = None,
            progress=None, latency_runs: int = 50) -> dict[str, Any]:
    """Measure every model on the same splits; write compare.json, compare.md and compare.png.

    Raises:
        ComparisonError: no models, or their split manifests or input sizes differ.
    """
    from .predictor import Predictor

    if not model_paths:
        raise ComparisonError("No models to compare.")
    model_paths = [Path(p) for p in model_paths]
    reference = _split_signature(model_paths[0])
    for path in model_paths[1:]:
        if _split_signature(path) != reference:
            raise ComparisonError(
                f"{path.name} was trained on different splits from {model_paths[0].name}; "
                "retrain both with the same --seed and --group-distance to compare them.")
    predictors = [Predictor.from_path(path) for path in model_paths]
    sizes = {p.input_size for p in predictors}
    if len(sizes) != 1:
        raise ComparisonError(f"The models take different input sizes {sorted(sizes)}.")
    data = load_dataset(data_root, sizes.pop(), cache_dir=cache_dir, progress=progress)
    manifest = json.loads(splits_path_for(model_paths[0]).read_text())
    sets = {s.name: s for s in eval_sets(data, manifest) if s.name in SETS}
    y = data.label_indices
    rows = []
    for path, predictor in zip(model_paths, predictors):
        predictor.load()
        raw = predictor.card.raw
        training = raw.get("training") or {}
        row: dict[str, Any] = {
            "name": predictor.card.name,
            "arch": raw.get("arch", "cnn"),
            "weights": raw.get("weights", "none"),
            "parameters": raw.get("parameters"),
            "file_mb": round(path.stat().st_size / 1e6, 2),
            "training_minutes": round(training["wall_seconds"] / 60, 1)
            if "wall_seconds" in training else None,
            "epochs": training.get("epochs_run"),
            "sets": {},
        }
        for name, eval_set in sets.items():
            probs = predictor.calibrate(predict_canonical(predictor, data.images[eval_set.indices]))
            metrics = classification_metrics(y[eval_set.indices], probs)
            row["sets"][name] = {key: metrics[key] for key in ("images", "accuracy", "macro_f1")}
        row["latency_ms"] = round(single_image_latency_ms(
            predictor, data.images[sets["test"].indices[0]] if "test" in sets else data.images[0],
            latency_runs), 2)
        rows.append(row)
    # The registry's rule for the default model (accuracy, then macro-F1), so row 1 is it.
    rows.sort(key=lambda r: (r["sets"].get("test", {}).get("accuracy") or 0,
                             r["sets"].get("test", {}).get("macro_f1") or 0), reverse=True)
    report = {"data": data.root.name, "sets": {n: s.description for n, s in sets.items()},
              "latency": f"median of {latency_runs} single-image forward passes (traced, batch 1)",
              "models": rows}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "compare.md").write_text(markdown_table(rows) + "\n")
    _plot(out_dir / "compare.png", rows)
    return report


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f} %"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The comparison as a Markdown table, best leakage-free accuracy (then macro-F1) first."""
    lines = [
        "| model | arch (weights) | leakage-free test acc | macro-F1 | official Testing acc "
        "| macro-F1 | unseen official acc | training min (epochs) | file MB | params "
        "| 1-image latency ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["sets"]
        test, official = s.get("test", {}), s.get("official_test", {})
        novel = s.get("official_test_novel", {})
        minutes = "n/a" if r["training_minutes"] is None else f"{r['training_minutes']} ({r['epochs']})"
        lines.append(
            f"| {r['name']} | {r['arch']} ({r['weights']}) | {_pct(test.get('accuracy'))} "
            f"| {_pct(test.get('macro_f1'))} | {_pct(official.get('accuracy'))} "
            f"| {_pct(official.get('macro_f1'))} | {_pct(novel.get('accuracy'))} | {minutes} "
            f"| {r['file_mb']} | {r['parameters']:,} | {r['latency_ms']} |"
        )
    return "\n".join(lines)


def _plot(path: Path, rows: list[dict[str, Any]]) -> None:
    from .plots import pyplot

    plt = pyplot()
    fig, (bars, scatter) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = [r["name"].removeprefix("brainmri_") for r in rows]
    labels = {"test": "leakage-free test", "official_test": "official Testing",
              "official_test_novel": "official, unseen part"}
    width = 0.8 / len(labels)
    for k, (key, label) in enumerate(labels.items()):
        values = [(r["sets"].get(key, {}).get("accuracy") or 0) * 100 for r in rows]
        positions = np.arange(len(rows)) + (k - (len(labels) - 1) / 2) * width
        drawn = bars.bar(positions, values, width, label=label)
        bars.bar_label(drawn, fmt="%.0f", fontsize=7)
    bars.set_xticks(np.arange(len(rows)), names)
    bars.set_ylabel("accuracy (%)")
    bars.set_ylim(0, 105)
    bars.set_title("Accuracy on identical splits")
    bars.legend(fontsize=8, loc="lower left")
    for r, name in zip(rows, names):
        accuracy = (r["sets"].get("test", {}).get("accuracy") or 0) * 100
        scatter.scatter(r["latency_ms"], accuracy, s=40 + 12 * r["file_mb"])
        scatter.annotate(f"{name}\n{r['file_mb']} MB", (r["latency_ms"], accuracy),
                         textcoords="offset points", xytext=(6, 4), fontsize=8)
    scatter.set_xlabel("single-image latency (ms, median, this CPU)")
    scatter.set_ylabel("leakage-free test accuracy (%)")
    scatter.set_title("Accuracy against speed (marker size: file size)")
    scatter.margins(0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
