"""Side-by-side comparison of trained models on identical splits: one table, one plot.

Every model is measured here, now, on the same images (not copied from each metadata file), so
the rows are comparable: each collection's held-out test split (per MRI sequence where the
collection names them), the official Testing folder's part with no near-copy in train/val, and
the Grad-CAM pointing score. A model may have trained on fewer collections than another (the
leave-one-collection-out baseline); a collection it never saw is scored on the same held-out
patients. Models whose splits of a shared collection differ are refused, since their test
figures would not measure the same thing. Rows are ordered by the registry's rule.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from .dataset import load_datasets
from .evaluation import by_sequence
from .evaluation import eval_sets
from .evaluation import pointing_score
from .evaluation import predict_canonical
from .metrics import binary_metrics
from .metrics import classification_metrics
from .splits import manifest_splits
from .splits import splits_path_for
from .splits import trained_collections
from ..inference import held_out_score

__all__ = ["ComparisonError", "compare", "markdown_table", "single_image_latency_ms"]

# Sets compared, by suffix of "<collection>/<set>".
SETS = ("/test", "/official_test", "/official_test_novel", "/unseen")


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


def _split_signature(model_path: Path) -> tuple[dict[str, dict[str, list[str]]], tuple]:
    """{collection: {split: sorted paths}} and (seed, group distance) of a model's manifest."""
    manifest_path = splits_path_for(model_path)
    if not manifest_path.is_file():
        raise ComparisonError(f"{manifest_path.name} is missing: {model_path.name} cannot be "
                              "placed on the shared splits (it is written by `brainmri train`).")
    manifest = json.loads(manifest_path.read_text())
    by_collection: dict[str, dict[str, list[str]]] = {}
    for name, paths in manifest_splits(manifest).items():
        for path in paths:
            by_collection.setdefault(path.split("/", 1)[0], {}).setdefault(name, []).append(path)
    for collection in trained_collections(manifest):
        by_collection.setdefault(collection, {})
    signature = {c: {n: sorted(p) for n, p in splits.items()} for c, splits in by_collection.items()}
    return signature, (manifest.get("seed", 42), manifest.get("group_distance"))


def _check_same_splits(model_paths: list[Path]) -> None:
    """Every pair of models must split each collection they share identically.

    Blank slices (`dataset.no_head_in_view`) are left out of the comparison: a manifest written
    before they were set aside lists them in a split, a newer one as `excluded`, and no
    evaluation set scores them either way.
    """
    signatures = [(path, *_split_signature(path)) for path in model_paths]
    blank = {p for _, sig, _ in signatures for splits in sig.values()
             for p in splits.get("excluded", [])}
    signatures = [(path, {c: {n: [p for p in paths if p not in blank]
                              for n, paths in splits.items() if n != "excluded"}
                          for c, splits in sig.items()}, seed)
                  for path, sig, seed in signatures]
    first_path, _, first_seed = signatures[0]
    for path, _, seed in signatures[1:]:
        if seed != first_seed:
            raise ComparisonError(
                f"{path.name} was split with (seed, group distance) {seed}, {first_path.name} "
                f"with {first_seed}; retrain with the same --seed and --group-distance.")
    for i, (path_a, sig_a, _) in enumerate(signatures):
        for path_b, sig_b, _ in signatures[i + 1:]:
            for collection in set(sig_a) & set(sig_b):
                if sig_a[collection] != sig_b[collection]:
                    raise ComparisonError(
                        f"{path_b.name} and {path_a.name} split {collection} differently; "
                        "retrain both with the same --seed and --group-distance to compare them.")


def set_figures(truth: np.ndarray, probs: np.ndarray, sequences: list[str]) -> dict[str, Any]:
    """The figures compared and stored in the metadata for one evaluation set."""
    metrics = classification_metrics(truth, probs)
    binary = binary_metrics(truth, probs)
    return {
        "images": metrics["images"], "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"], "ece": metrics["ece"],
        "sensitivity": binary["sensitivity"], "specificity": binary["specificity"],
        "by_sequence": by_sequence(truth, probs, sequences),
    }


def compare(model_paths: list[Path], data_roots: Path | list[Path], out_dir: Path,
            cache_dir: Path | None = None, progress=None, latency_runs: int = 50) -> dict[str, Any]:
    """Measure every model on the same splits; write compare.json, compare.md and compare.png.

    Raises:
        ComparisonError: no models, or their split manifests or input sizes differ.
    """
    from ..inference import Predictor

    if not model_paths:
        raise ComparisonError("No models to compare.")
    model_paths = [Path(p) for p in model_paths]
    _check_same_splits(model_paths)
    predictors = [Predictor.from_path(path) for path in model_paths]
    sizes = {p.input_size for p in predictors}
    if len(sizes) != 1:
        raise ComparisonError(f"The models take different input sizes {sorted(sizes)}.")
    data = load_datasets(data_roots, sizes.pop(), cache_dir=cache_dir, progress=progress)
    y = data.label_indices
    rows = []
    descriptions: dict[str, str] = {}
    for path, predictor in zip(model_paths, predictors):
        predictor.load()
        manifest = json.loads(splits_path_for(path).read_text())
        sets = {s.name: s for s in eval_sets(data, manifest) if s.name.endswith(SETS)}
        raw = predictor.card.raw
        training = raw.get("training") or {}
        row: dict[str, Any] = {
            "name": predictor.card.name,
            "arch": raw.get("arch", "cnn"),
            "weights": raw.get("weights", "none"),
            "trained_on": trained_collections(manifest),
            "parameters": raw.get("parameters"),
            "file_mb": round(path.stat().st_size / 1e6, 2),
            "training_minutes": round(training["wall_seconds"] / 60, 1)
            if "wall_seconds" in training else None,
            "epochs": training.get("epochs_run"),
            "sets": {},
            "pointing": {},
        }
        for name, eval_set in sets.items():
            descriptions.setdefault(name, eval_set.description)
            probs = predictor.calibrate(predict_canonical(predictor, data.images[eval_set.indices]))
            row["sets"][name] = set_figures(y[eval_set.indices], probs,
                                            [data.sequences[i] for i in eval_set.indices])
            if name.endswith("/test"):
                pointing = pointing_score(predictor, data, eval_set.indices)
                if pointing is not None:
                    row["pointing"][name] = pointing
        first_test = next((s for n, s in sets.items() if n.endswith("/test")), None)
        row["latency_ms"] = round(single_image_latency_ms(
            predictor, data.images[first_test.indices[0]] if first_test else data.images[0],
            latency_runs), 2)
        row["held_out_score"] = held_out_score({"evaluation": row["sets"]})
        rows.append(row)
    # The registry's rule for the default model, so row 1 is the one it would serve first.
    rows.sort(key=lambda r: r["held_out_score"], reverse=True)
    report = {"data": data.name, "sets": descriptions,
              "latency": f"median of {latency_runs} single-image forward passes (traced, batch 1)",
              "ranking": "registry.held_out_score: worst off-collection figure, then mean "
                         "in-collection test accuracy",
              "models": rows}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "compare.md").write_text(markdown_table(rows) + "\n")
    _plot(out_dir / "compare.png", rows)
    return report


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f} %"


def _worst(entry: dict[str, Any], key: str) -> float | None:
    values = [seq[key] for seq in (entry.get("by_sequence") or {}).values() if seq.get(key) is not None]
    return min(values) if values else entry.get(key)


def _find(sets: dict[str, Any], suffix: str, prefer: str | None = None) -> dict[str, Any]:
    if prefer and f"{prefer}{suffix}" in sets:
        return sets[f"{prefer}{suffix}"]
    return next((v for k, v in sets.items() if k.endswith(suffix)), {})


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The comparison as a Markdown table, in the registry's order (the default first)."""
    lines = [
        "| model | trained on | SARTAJ test acc | official unseen acc | LGG held-out sensitivity "
        "(worst sequence) | LGG specificity (worst sequence) | LGG pointing | worst held-out "
        "figure | training min (epochs) | file MB | params | 1-image latency ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["sets"]
        sartaj = s.get("sartaj/test", {})
        novel = _find(s, "/official_test_novel")
        lgg = s.get("lgg/test", {})
        pointing = (r["pointing"].get("lgg/test") or {}).get("pointing")
        minutes = "n/a" if r["training_minutes"] is None else f"{r['training_minutes']} ({r['epochs']})"
        worst = r["held_out_score"][0]
        lines.append(
            f"| {r['name']} | {'+'.join(r['trained_on'])} | {_pct(sartaj.get('accuracy'))} "
            f"| {_pct(novel.get('accuracy'))} | {_pct(_worst(lgg, 'sensitivity'))} "
            f"| {_pct(_worst(lgg, 'specificity'))} | {_pct(pointing)} "
            f"| {_pct(worst if worst >= 0 else None)} | {minutes} "
            f"| {r['file_mb']} | {r['parameters']:,} | {r['latency_ms']} |"
        )
    return "\n".join(lines)


def _plot(path: Path, rows: list[dict[str, Any]]) -> None:
    from .plots import pyplot

    plt = pyplot()
    fig, (bars, scatter) = plt.subplots(1, 2, figsize=(12, 4.4))
    names = [r["name"].removeprefix("brainmri_") for r in rows]
    figures = {
        "SARTAJ test acc": lambda r: r["sets"].get("sartaj/test", {}).get("accuracy"),
        "official unseen acc": lambda r: _find(r["sets"], "/official_test_novel").get("accuracy"),
        "LGG sensitivity (worst seq.)": lambda r: _worst(r["sets"].get("lgg/test", {}), "sensitivity"),
        "LGG specificity (worst seq.)": lambda r: _worst(r["sets"].get("lgg/test", {}), "specificity"),
        "LGG pointing": lambda r: (r["pointing"].get("lgg/test") or {}).get("pointing"),
    }
    width = 0.8 / len(figures)
    for k, (label, get) in enumerate(figures.items()):
        values = [(get(r) or 0) * 100 for r in rows]
        positions = np.arange(len(rows)) + (k - (len(figures) - 1) / 2) * width
        drawn = bars.bar(positions, values, width, label=label)
        bars.bar_label(drawn, fmt="%.0f", fontsize=6)
    bars.set_xticks(np.arange(len(rows)), names, fontsize=8)
    bars.set_ylabel("%")
    bars.set_ylim(0, 110)
    bars.set_title("Held-out figures on identical splits")
    bars.legend(fontsize=7, loc="lower left")
    for r, name in zip(rows, names):
        worst = max(r["held_out_score"][0], 0) * 100
        scatter.scatter(r["latency_ms"], worst, s=40 + 12 * r["file_mb"])
        scatter.annotate(f"{name}\n{r['file_mb']} MB", (r["latency_ms"], worst),
                         textcoords="offset points", xytext=(6, 4), fontsize=8)
    scatter.set_xlabel("single-image latency (ms, median, this CPU)")
    scatter.set_ylabel("worst held-out figure (%)")
    scatter.set_title("Worst held-out figure against speed (marker: file size)")
    scatter.margins(0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
