"""The `brainmri` command: train, evaluate, compare, calibrate, predict, audit, export, build-cache;
Flask's run.

TensorFlow is imported inside the commands that need it, so `brainmri --help` and `audit`
stay fast.
"""

from __future__ import annotations

import csv
import json
import shlex
import sys
from collections import Counter
from pathlib import Path

import click
import numpy as np
from flask.cli import FlaskGroup
from flask.cli import NoAppException

from .config import DEFAULTS
from .config import PROJECT_ROOT
from .inference import CLASSES
from .inference import PREDICT_COLUMNS
from .inference import ModelError
from .inference import csv_row
from .training import ARCHITECTURES

__all__ = ["cli"]

MODEL_DIR = Path(DEFAULTS["BRAINMRI_MODEL_DIR"])
_MODEL_HELP = "Model .h5 [default: the served default in model/, the best on the leakage-free test]."


def _model_or_default(model_path: Path | None) -> Path:
    """`model_path`, else the registry's default model (best leakage-free test figures)."""
    if model_path is not None:
        return model_path
    from .inference import default_model_path

    try:
        return default_model_path(MODEL_DIR)
    except ModelError as exc:
        raise click.ClickException(str(exc)) from exc
_DIR = click.Path(exists=True, file_okay=False, path_type=Path)


def _create_cli_app():
    """The app for Flask's own commands; a missing model is reported, not a traceback."""
    from . import create_app

    try:
        return create_app()
    except ModelError as exc:
        raise NoAppException(str(exc)) from exc


@click.group(cls=FlaskGroup, create_app=_create_cli_app)
def cli() -> None:
    """BrainMRI: train, evaluate and serve a brain MRI tumor classifier (research use only)."""


def _progress_bar(length: int, label: str):
    return click.progressbar(length=length, label=label, file=sys.stderr, show_pos=True,
                             show_eta=True)


def _reproducible_command(ctx: click.Context) -> str:
    """The command line that repeats this run: every option the user set, quoted."""
    from click.core import ParameterSource

    parts = ["uv", "run", "brainmri", ctx.info_name or "train"]
    for param in ctx.command.params:
        if ctx.get_parameter_source(param.name) is ParameterSource.DEFAULT:
            continue
        value = ctx.params[param.name]
        if getattr(param, "is_flag", False):
            parts += [param.opts[0]] if value else []
        elif getattr(param, "multiple", False):
            for item in value:
                parts += [param.opts[0], str(item)]
        else:
            parts += [param.opts[0], str(value)]
    return shlex.join(parts)


def _with_cache_progress(data: Path | tuple[Path, ...], label: str):
    """A progress bar sized to the number of images under the data root(s), and its callback."""
    from .training import discover

    roots = [data] if isinstance(data, Path) else list(data)
    bar = _progress_bar(sum(len(discover(root)) for root in roots), label)
    return bar, bar.update


_DATA_HELP = ("Data set folder (repeat for several collections): Training/<class>/ and "
              "Testing/<class>/, or <class>/ folders; a slices.csv with slice,patient columns "
              "makes the split go by patient.")


@cli.command("train", with_appcontext=False)
@click.option("--data", type=_DIR, required=True, multiple=True, help=_DATA_HELP)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=MODEL_DIR, show_default=True, help="Where to write the model.")
@click.option("--arch", type=click.Choice(list(ARCHITECTURES)), default="cnn", show_default=True,
              help="Network to train (all take the same preprocessed input).")
@click.option("--weights", default="none", show_default=True,
              help="Starting weights: none, imagenet (downloads; mobilenetv2/efficientnetb0), "
                   "imagenet-lite0 (offline, efficientnet_lite0) or a local weights file.")
@click.option("--name", default=None, help="Model file stem [default: brainmri_<arch>].")
@click.option("--epochs", default=60, show_default=True, help="Upper bound; early stopping ends sooner.")
@click.option("--epoch-images", default=3072, show_default=True,
              help="Images drawn per epoch (balanced, see --balance).")
@click.option("--min-resolution", default=0.4, show_default=True,
              help="Lost-resolution augmentation goes down to this fraction of the side.")
@click.option("--balance", type=click.Choice(["collection", "cell"]), default="cell",
              show_default=True,
              help="collection: each collection draws alike, its classes evenly; cell: each "
                   "(collection, class) draws alike.")
@click.option("--contrast", type=click.Choice(["none", "gin"]), default="none", show_default=True,
              help="Random tissue contrast in training (gin: random shallow convolutions and "
                   "intensity curves), so that the answer follows the anatomy, not one sequence.")
@click.option("--skull-strip", default=0.0, show_default=True,
              help="Share of training images given a skull-stripped look (research volumes "
                   "such as BraTS are brain-extracted); the shipped CNN used 0.")
@click.option("--exclude-sequence", "exclude_sequences", multiple=True,
              type=click.Choice(["t1", "t1c", "t2", "flair"]),
              help="Leave this sequence out of training and validation (leave-one-sequence-out); "
                   "the test split still scores it. Repeatable.")
@click.option("--max-minutes", default=28.0, show_default=True,
              help="Wall-clock budget for the training loop (stops after the epoch that crosses it).")
@click.option("--size", default=128, show_default=True, help="Square input side in pixels.")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--learning-rate", type=float, default=None,
              help="AdamW learning rate [default: 2e-3; 5e-4 when fine-tuning efficientnet_lite0].")
@click.option("--seed", default=42, show_default=True, help="Seed for the split and training.")
@click.option("--group-distance", default=None, type=int,
              help="pHash Hamming distance that makes two images duplicates [default: 4].")
@click.option("--exclude-test-duplicates", is_flag=True,
              help="Also keep out of training every image with a near-duplicate in Testing/.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Preprocessed-image cache [default: $BRAINMRI_CACHE or ./.cache/brainmri].")
def train_command(data: tuple[Path, ...], out: Path, arch: str, weights: str, name: str | None,
                  epochs: int, epoch_images: int, min_resolution: float, balance: str,
                  max_minutes: float, size: int, batch_size: int, learning_rate: float | None,
                  seed: int, group_distance: int | None, exclude_test_duplicates: bool,
                  cache_dir: Path | None, contrast: str = "none", skull_strip: float = 0.0,
                  exclude_sequences: tuple[str, ...] = ()) -> None:
    """Train a network on leakage-free splits and write <name>.h5 with its metadata."""
    from . import training
    from .training import check_weights
    from .training import dedup

    try:  # fail before the slow part
        check_weights(arch, weights)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--weights") from exc
    config = training.TrainConfig(
        arch=arch, weights=None if weights == "none" else weights,
        name=name or f"brainmri_{arch}",
        size=size, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
        max_minutes=max_minutes, epoch_images=epoch_images, balance=balance,
        min_resolution=min_resolution, contrast=contrast, skull_strip=skull_strip,
        exclude_sequences=tuple(exclude_sequences),
        group_distance=dedup.DEFAULT_MAX_DISTANCE if group_distance is None else group_distance,
        exclude_official_test_duplicates=exclude_test_duplicates,
    )
    from .training import load_datasets

    # Decode and preprocess once (cached), under a progress bar, before Keras prints epochs.
    bar, update = _with_cache_progress(data, "Preprocessing images")
    with bar:
        load_datasets(data, size, cache_dir=cache_dir, progress=update)
    command = _reproducible_command(click.get_current_context())
    result = training.train(list(data), out, config, cache_dir=cache_dir, command=command)
    click.echo(f"Wrote {result.model_path} ({result.model_path.stat().st_size / 1e6:.2f} MB), "
               f"{result.metadata_path.name}, {result.history_path.name}, {result.splits_path.name}")
    click.echo(f"Training took {result.wall_seconds / 60:.1f} min, {result.epochs_run} epochs "
               f"(best epoch {result.best_epoch}); validation accuracy "
               f"{result.validation['val_accuracy']:.4f}")
    for split, counts in result.split_counts.items():
        click.echo(f"  {split:>14}: {sum(counts.values()):5d} images {counts}")


@cli.command("evaluate", with_appcontext=False)
@click.option("--data", type=_DIR, required=True, multiple=True,
              help="Data set folder (repeat for several); collections the model never trained "
                   "on are scored as unseen.")
@click.option("--model", "model_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help=_MODEL_HELP)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=PROJECT_ROOT / "reports", show_default=True)
@click.option("--write-metadata", is_flag=True,
              help="Store the headline figures in the model's metadata JSON.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
def evaluate_command(data: tuple[Path, ...], model_path: Path | None, out: Path, write_metadata: bool,
                     cache_dir: Path | None) -> None:
    """Write metrics.json and plots (confusion, ROC, confidence, reliability, training curves)."""
    model_path = _model_or_default(model_path)
    from .inference import metadata_path_for
    from .training import evaluation

    bar, update = _with_cache_progress(data, "Loading images")
    with bar:
        report = evaluation.evaluate(model_path, list(data), out, cache_dir=cache_dir,
                                     progress=update)
    for name, metrics in report["sets"].items():
        recall = {c: metrics["per_class"][c]["recall"] for c in CLASSES}
        binary = metrics["tumor_vs_no_tumor"]
        click.echo(f"{name:>26}: n={metrics['images']:5d} accuracy={metrics['accuracy']:.4f} "
                   f"macro-F1={metrics['macro_f1']:.4f} ECE={metrics['ece']:.4f} "
                   f"tumour sensitivity={binary['sensitivity']} specificity={binary['specificity']} "
                   f"recall={recall}")
        for sequence, figures in metrics["by_sequence"].items():
            click.echo(f"{'':>26}  {sequence:>5}: n={figures['images']:5d} "
                       f"accuracy={figures['accuracy']:.4f} sensitivity={figures['sensitivity']} "
                       f"specificity={figures['specificity']}")
    for name, pointing in report["pointing"].items():
        click.echo(f"{name:>26}: Grad-CAM pointing {pointing['pointing']:.4f} on "
                   f"{pointing['slices']} tumour slices {pointing['by_sequence']}")
    _echo_trust(report.get("trust") or {})
    click.echo(f"Wrote {out / 'metrics.json'} and {len(report['plots'])} plots")
    if write_metadata:
        meta_path = metadata_path_for(model_path)
        meta = json.loads(meta_path.read_text())
        meta["evaluation"] = {
            name: {key: m[key] for key in ("images", "accuracy", "macro_f1", "ece")}
            | {"recall": {c: m["per_class"][c]["recall"] for c in CLASSES}}
            | {key: m["tumor_vs_no_tumor"][key] for key in ("sensitivity", "specificity")}
            | {"by_sequence": m["by_sequence"]}
            for name, m in report["sets"].items()
        }
        meta["pointing"] = report["pointing"]
        meta["reliability"] = _reliability(report)
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        click.echo(f"Updated {meta_path}")


# Sets the model never trained or validated on (patients, collections, near-copies).
_HELD_OUT_SUFFIXES = ("/test", "/unseen", "/official_test_novel")


def _reliability(report: dict) -> dict:
    """How the answers shown as confident fared on every held-out set, and the worst of them
    (the figure the result page quotes)."""
    sets = {name: c["served"] for name, c in (report.get("trust") or {}).get("calibration", {}).items()
            if name.endswith(_HELD_OUT_SUFFIXES) and c.get("served", {}).get("precision") is not None}
    if not sets:
        return {}
    worst = min(sets, key=lambda name: sets[name]["precision"])
    return {"sets": {name: {k: v for k, v in s.items() if k != "by_sequence"}
                     for name, s in sets.items()},
            "worst": {"set": worst, **{k: sets[worst][k] for k in ("precision", "coverage", "images")}},
            "measured_by": "brainmri evaluate --write-metadata (guard, calibration and the "
                           "uncertain rule as served)"}


def _echo_trust(trust: dict) -> None:
    """Print ECE before/after, false refusals and OOD refusals per category."""
    if not trust:
        return
    click.echo(f"Calibration: temperature {trust['temperature']:.4f}, "
               f"uncertain below {trust['uncertain_below']}")
    for name, c in trust["calibration"].items():
        flagged = f" uncertain={c['uncertain_rate']:.4f}" if "uncertain_rate" in c else ""
        served = c.get("served")
        if served and served.get("precision") is not None:
            flagged += (f" confident {served['coverage']:.4f} of slices, right "
                        f"{served['precision']:.4f}")
        click.echo(f"{name:>20}: ECE {c['ece_before']:.4f} -> {c['ece_after']:.4f} "
                   f"NLL {c['nll_before']:.4f} -> {c['nll_after']:.4f}{flagged}")
    for name, r in trust["false_refusal"].items():
        click.echo(f"{name:>20}: false refusals {r['refused']}/{r['images']} = {r['rate']:.4f} {r['reasons']}")
        if "mri_only" in r:  # some of its slices are not MRI (trust.listed_not_mri)
            m, x = r["mri_only"], r["listed_not_mri"]
            click.echo(f"{'':>20}  of its MRI {m['refused']}/{m['images']} = {m['rate']:.4f}; "
                       f"listed as not MRI: refused {x['refused']}/{x['images']}")
    ood = trust["ood"]
    if "categories" in (ood.get("real_held_out") or {}):
        _echo_held_out(ood["real_held_out"])
    if "categories" not in ood:
        click.echo(ood.get("note", ""))
        return
    for name, c in ood["categories"].items():
        extra = f" accuracy of passed={c['accuracy_of_passed']:.3f}" if "accuracy_of_passed" in c else ""
        exposed = " (exposed: its transform family trained the exposure head)" if c.get("exposed") else ""
        click.echo(f"{name:>20}: expect {c['expect']:<6} refused {c['refused']:3d}/{c['images']:3d} "
                   f"= {c['refusal_rate']:.3f}{extra}{exposed}")
    click.echo(f"OOD refusal rate (should-refuse images, n={ood['images_expected_refuse']}): "
               f"{ood['refusal_rate_expected_refuse']:.4f}; refusal of should-pass MRI variants: "
               f"{ood['refusal_rate_expected_pass']:.4f}")
    if ood.get("refusal_rate_expected_refuse_unexposed") is not None:
        click.echo(f"OOD refusal rate of categories the exposure head never saw "
                   f"(n={ood['images_expected_refuse_unexposed']}): "
                   f"{ood['refusal_rate_expected_refuse_unexposed']:.4f}")


@cli.command("compare", with_appcontext=False)
@click.option("--data", type=_DIR, required=True, multiple=True,
              help="Data set folder (repeat for several collections).")
@click.option("--model", "model_paths", multiple=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A model to compare (repeatable) [default: every model in model/].")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=PROJECT_ROOT / "reports", show_default=True)
@click.option("--latency-runs", default=50, show_default=True,
              help="Single-image forward passes timed per model (the median is reported).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
def compare_command(data: tuple[Path, ...], model_paths: tuple[Path, ...], out: Path, latency_runs: int,
                    cache_dir: Path | None) -> None:
    """Measure every model on identical splits: compare.md table, compare.json, compare.png."""
    from .inference import discover_models
    from .training import ComparisonError
    from .training import compare
    from .training import markdown_table

    paths = list(model_paths) or discover_models(MODEL_DIR)
    bar, update = _with_cache_progress(data, "Loading images")
    try:
        with bar:
            report = compare(paths, list(data), out, cache_dir=cache_dir, progress=update,
                             latency_runs=latency_runs)
    except (ComparisonError, ModelError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(markdown_table(report["models"]))
    click.echo(f"Wrote {out / 'compare.md'}, {out / 'compare.json'}, {out / 'compare.png'}")


@cli.command("calibrate", with_appcontext=False)
@click.option("--data", type=_DIR, required=True, multiple=True,
              help="Data set folder(s) the model was trained on (repeat for several).")
@click.option("--model", "model_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help=_MODEL_HELP)
@click.option("--target-accuracy", default=0.98, show_default=True,
              help="Accuracy that predictions not flagged 'uncertain' must reach on validation.")
@click.option("--ood-data", type=_DIR, default=None,
              help="Real images that are not brain MRI, by category, with SOURCES.tsv "
                   "[default: $BRAINMRI_OOD_DATA or ../shared/data/ood_train].")
@click.option("--guard-network", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Guard network from `brainmri train-guard` [default: "
                                 "guard/brainmri_guard.h5 beside the model, when it exists].")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
def calibrate_command(data: tuple[Path, ...], model_path: Path | None, target_accuracy: float,
                      ood_data: Path | None, guard_network: Path | None,
                      cache_dir: Path | None) -> None:
    """Fit temperature, 'uncertain' threshold and OOD guard on the val split; store in metadata."""
    from .training import trust

    model_path = _model_or_default(model_path)
    bar, update = _with_cache_progress(data, "Loading images")
    with bar:
        result = trust.calibrate(model_path, list(data), cache_dir=cache_dir,
                                 target_accuracy=target_accuracy, progress=update,
                                 ood_root=ood_data, guard_network=guard_network)
    c, o = result["calibration"], result["ood"]
    click.echo(f"Temperature {c['temperature']:.4f} (val NLL {c['nll_before']:.4f} -> {c['nll_after']:.4f}, "
               f"ECE {c['ece_before']:.4f} -> {c['ece_after']:.4f}, n={c['images']})")
    click.echo(f"Uncertain below {c['uncertain_below']:.4f}: val coverage {c['coverage']}, accuracy "
               f"{c['accuracy_confident']} confident vs {c['accuracy_uncertain']} uncertain "
               f"(target {c['target_accuracy']})")
    for name, (low, high) in o["bounds"].items():
        click.echo(f"  OOD bound {name:>18}: [{low}, {high}]")
    click.echo(f"Val refusal rate {o['val_refusal_rate']:.4f}; updated {result['metadata']}")
    _echo_held_out(o["held_out"])


@cli.command("train-guard", with_appcontext=False)
@click.option("--data", type=_DIR, required=True, multiple=True,
              help="Brain MRI data set folder(s) whose training split are the positives (repeat).")
@click.option("--ood-data", type=_DIR, default=None,
              help="Real images that are not brain MRI, by category, with SOURCES.tsv "
                   "[default: $BRAINMRI_OOD_DATA or ../shared/data/ood_train].")
@click.option("--splits", "splits_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Split manifest whose train/val the guard uses [default: the "
                                 "default model's, so no model's val or test slice is trained on].")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the guard network [default: <model dir>/guard/brainmri_guard.h5].")
@click.option("--network", type=click.Choice(["trunk", "cnn"]), default="trunk", show_default=True,
              help="trunk: a frozen ImageNet Lite0 trunk with a fitted head (shipped); cnn: the "
                   "small network trained from scratch that it replaced.")
@click.option("--epochs", default=12, show_default=True, help="With --network cnn only.")
@click.option("--held-out/--no-held-out", default=False, show_default=True,
              help="Also retrain once per real category and per brain collection left out and "
                   "record what a guard that never saw them refuses (one training each).")
@click.option("--held-out-category", "held_out_categories", multiple=True,
              help="With --held-out: only these categories (repeat) [default: every one].")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.pass_context
def train_guard_command(ctx: click.Context, data: tuple[Path, ...], ood_data: Path | None,
                        splits_path: Path | None, out: Path | None, network: str, epochs: int,
                        held_out: bool,
                        held_out_categories: tuple[str, ...], cache_dir: Path | None) -> None:
    """Train the guard network that refuses images that are not brain MRI slices."""
    import json

    from .training import guard_training
    from .training import ood_sets
    from .training import splits
    from .training import trust

    manifest_path = splits_path or splits.splits_path_for(_model_or_default(None))
    config = (guard_training.GuardConfig() if network == "trunk"
              else guard_training.GuardConfig.cnn(epochs=epochs))
    bar, update = _with_cache_progress(data, "Loading images")
    with bar:
        prepared = guard_training.assemble(list(data), json.loads(manifest_path.read_text()),
                                           ood_data or ood_sets.default_ood_root(),
                                           config=config, cache_dir=cache_dir, progress=update)
    click.echo(f"{len(prepared.positives)} brain slices, {int(prepared.real.sum())} real and "
               f"{int((~prepared.real).sum())} synthetic negatives")
    report = (guard_training.held_out(prepared, config, list(held_out_categories) or None,
                                      progress=click.echo) if held_out else None)
    import hashlib

    block = guard_training.fit(prepared, out or MODEL_DIR / trust.GUARD_FILE, config, report,
                               command=_reproducible_command(ctx), progress=click.echo,
                               splits_sha256=hashlib.sha256(manifest_path.read_bytes()).hexdigest())
    click.echo(f"Bound {block['bound']:.4f} (logit), {block['embedding']['bound']:.4f} (distance); "
               f"validation refused {block['val_refusal_rate']}")
    if report:
        for category, tally in report["categories"].items():
            click.echo(f"  held out {category:>38}: refused {tally['refused']}/{tally['images']}"
                       f" = {tally['rate']:.3f}")
        click.echo(f"  overall {report['overall']:.4f}; brain collections left out: "
                   f"{report['collections']}")
        for category, by_source in (report.get("sources") or {}).items():
            refused = sum(t["refused"] for t in by_source.values())
            images = sum(t["images"] for t in by_source.values())
            worst = min(by_source.items(), key=lambda item: item[1]["rate"])
            click.echo(f"  one source out {category:>32}: refused {refused}/{images}; worst "
                       f"{worst[0]} {worst[1]['refused']}/{worst[1]['images']}")
    click.echo("Now run `brainmri calibrate` for each model so that its guard uses this network.")


def _echo_held_out(held: dict) -> None:
    """Refusal of each real category (and source) by a guard that never saw it."""
    click.echo("Guard on real images it never saw (leave-one-category-out, then -source-out):")
    for category, tally in held["categories"].items():
        sources = held["sources"].get(category, {})
        worst = min((t["rate"] for t in sources.values()), default=None)
        extra = f"; worst held-out source {worst:.3f} of {len(sources)}" if sources else ""
        click.echo(f"  {category:>38}: refused {tally['refused']:3d}/{tally['images']:3d} "
                   f"= {tally['rate']:.3f}{extra}")
    click.echo(f"  overall {held['overall']:.4f} of {held['images']} images; worst category "
               f"{held['worst_category'][1]} {held['worst_category'][0]:.3f}")
    network = held.get("network")
    if network and network.get("in_sample_categories"):
        click.echo("  (the guard network was not retrained without "
                   f"{', '.join(network['in_sample_categories'])}: those figures are optimistic)")


def _find_inputs(paths: list[Path]) -> tuple[list[Path], Counter[str]]:
    """Files to classify, and a count per suffix of the other files found in folders.

    Folders are searched recursively (sorted) and filtered with the page's and the API's
    extension allow-list; the other files are counted (".webp": 2, "(no extension)": 1). A file
    named on the command line is always tried, since its content decides, as for an upload.
    """
    from .web import ALLOWED_EXTENSIONS

    allowed = (*ALLOWED_EXTENSIONS, *VOLUME_SUFFIXES)
    accepted: list[Path] = []
    skipped: Counter[str] = Counter()
    for path in paths:
        if not path.is_dir():
            accepted.append(path)
            continue
        for child in sorted(path.rglob("*")):
            if not child.is_file():
                continue
            suffix = child.suffix.lower()
            if suffix in allowed and (suffix != ".gz" or _is_volume(child)):
                accepted.append(child)
            else:
                skipped[suffix or "(no extension)"] += 1
    return accepted, skipped


# NIfTI volumes: `brainmri predict` writes one row per axial slice (imaging/volumes.py).
VOLUME_SUFFIXES = (".nii", ".gz")


def _is_volume(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def _skipped_text(skipped: Counter[str]) -> str:
    """'Skipped 3 files that are not PNG, JPEG or DICOM: 2 .webp, 1 .txt', most common first."""
    total = sum(skipped.values())
    kinds = ", ".join(f"{count} {suffix}" for suffix, count in
                      sorted(skipped.items(), key=lambda item: (-item[1], item[0])))
    files = "file that is" if total == 1 else "files that are"
    return (f"Skipped {total} {files} not PNG, JPEG or DICOM: {kinds} "
            "(name a file on the command line to try it anyway).")


@cli.command("predict", with_appcontext=False)
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Output CSV (one row per file, written as it goes).")
@click.option("--model", "model_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help=_MODEL_HELP)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--no-guard", is_flag=True,
              help="Research use: give a class even to files the out-of-distribution guard "
                   "would refuse (a DICOM of another modality than MR is still refused).")
@click.option("--engine", type=click.Choice(["plain", "ray"]), default="plain", show_default=True,
              help="plain: this process. ray: Ray Data tasks read and preprocess the files, "
                   "actors holding the model classify them; same answers (uv sync --extra ray).")
@click.option("--address", default=None,
              help="With --engine ray: the Ray cluster to join (auto, ray://head:10001) "
                   "[default: a local Ray instance for this run].")
@click.option("--by-study", is_flag=True,
              help="One summary row per study instead of one per file: each NIfTI volume, each "
                   "ZIP, and the files of each folder (a DICOM series, or slices ordered by "
                   "name) are one study, screened as POST /api/v1/studies does.")
def predict_command(paths: tuple[Path, ...], csv_path: Path, model_path: Path | None,
                    batch_size: int, no_guard: bool, engine: str = "plain",
                    address: str | None = None, by_study: bool = False) -> None:
    """Classify PNG/JPEG/DICOM files, NIfTI volumes and folders (recursive) into a CSV, screened
    like an upload.

    Each file takes the page's and the API's path (inference/guarded.py): refusals get refused=true
    and the reason but no class, weak answers uncertain=true, and unusable files an error. A
    NIfTI volume (.nii, .nii.gz) gives one row per axial slice, its index in the `slice` column
    (present when a volume is among the inputs); blank slices say so and are not scored.
    """
    from . import inference
    from .inference import Predictor

    if address is not None and engine != "ray":
        raise click.BadParameter("only with --engine ray", param_hint="--address")
    if by_study and engine != "plain":
        raise click.BadParameter("only with --engine plain", param_hint="--by-study")
    files, skipped = _find_inputs(list(paths))
    volumes = [path for path in files if _is_volume(path)]
    if volumes and engine != "plain":
        raise click.BadParameter("NIfTI volumes are read by the plain engine only",
                                 param_hint="--engine")
    model = _model_or_default(model_path)
    predictor = Predictor.from_path(model)
    if engine == "plain":  # the Ray engine loads the model in its actors, not here
        predictor.load()
    threshold = inference.uncertain_threshold(predictor, DEFAULTS["BRAINMRI_UNCERTAIN_BELOW"])
    if no_guard:
        click.echo("Guard off (--no-guard): files that are not brain MRI slices get a class too.",
                   err=True)
    elif getattr(predictor, "guard", None) is None:
        click.echo("This model has no fitted out-of-distribution guard (run `brainmri "
                   "calibrate`); only DICOM files of another modality are refused.", err=True)
    if by_study:
        from .inference import predict_by_study

        written = predict_by_study(list(paths), predictor, csv_path, threshold, not no_guard)
        click.echo(f"Wrote {csv_path}: {written} studies")
        return
    if engine == "ray":
        counts = _predict_with_ray(files, model, csv_path, batch_size, threshold,
                                   not no_guard, address)
    else:
        counts = _predict_plain([path for path in files if not _is_volume(path)], predictor,
                                csv_path, batch_size, threshold, not no_guard, volumes)
    if skipped:
        click.echo(_skipped_text(skipped))
    click.echo(f"Wrote {csv_path}: {counts['classified']} classified ({counts['uncertain']} "
               f"uncertain), {counts['refused']} refused, {counts['unreadable']} unreadable, "
               f"{sum(skipped.values())} skipped")


def _predict_plain(files: list[Path], predictor, csv_path: Path, batch_size: int,
                   threshold: float, guard: bool, volumes: list[Path] = ()) -> Counter[str]:
    """The plain engine: chunks of `batch_size` files, one forward pass each, in this process;
    then each volume's slices (a `slice` column is added when there are volumes)."""
    from . import inference

    counts: Counter[str] = Counter()
    with csv_path.open("w", newline="", encoding="utf-8") as handle, \
            _progress_bar(len(files) + len(volumes), "Classifying") as bar:
        writer = csv.writer(handle)
        if volumes:
            from .inference import VolumeRows

            writer = VolumeRows(writer)
        writer.writerow(PREDICT_COLUMNS)
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            outcomes: dict[int, inference.Outcome] = {}
            read: list[tuple[int, bytes]] = []
            for position, path in enumerate(chunk):
                try:
                    read.append((position, path.read_bytes()))
                except OSError as exc:  # one unreadable file never ends the run
                    outcomes[position] = inference.Outcome(error=exc)
            # Every file of the chunk prepared, then one batched forward pass (and guard).
            classified = inference.classify_many(predictor, [data for _, data in read], threshold,
                                                 guard=guard, isolate=True)
            outcomes.update(zip((position for position, _ in read), classified))
            for position, path in enumerate(chunk):
                outcome = outcomes[position]
                writer.writerow(csv_row(path, outcome))
                if outcome.prediction is not None:
                    counts["classified"] += 1
                    counts["uncertain"] += int(outcome.prediction.uncertain)
                else:
                    counts["refused" if outcome.refused else "unreadable"] += 1
            handle.flush()
            bar.update(len(chunk))
        for volume in volumes:
            writer.write_volume(volume, predictor, threshold, guard, counts)
            handle.flush()
            bar.update(1)
    return counts


@cli.command("audit", with_appcontext=False)
@click.argument("data", type=_DIR)
@click.option("--distance", default=None, type=int,
              help="pHash Hamming distance that makes two images duplicates [default: 4].")
@click.option("--show", default=20, show_default=True, help="How many groups to list.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
def audit_command(data: Path, distance: int | None, show: int, cache_dir: Path | None) -> None:
    """Print near-duplicate groups, label conflicts and Training/Testing leaks in a data set."""
    from .training import dedup
    from .training import load_dataset

    distance = dedup.DEFAULT_MAX_DISTANCE if distance is None else distance
    bar, update = _with_cache_progress(data, "Hashing images")
    with bar:
        dataset = load_dataset(data, 128, cache_dir=cache_dir, progress=update)
    group_ids = dedup.group_near_duplicates(dataset.hashes, distance)
    groups = dedup.duplicate_groups(group_ids, dataset.labels)
    conflicts = [g for g in groups if g.conflicting]
    in_groups = sum(len(g.members) for g in groups)
    click.echo(f"{len(dataset.paths)} images, {len(groups)} near-duplicate groups "
               f"(pHash distance <= {distance}) holding {in_groups} images; "
               f"{len(conflicts)} groups carry conflicting labels.")
    sources = dataset.sources
    leaked = [i for i, s in enumerate(sources) if s == "test"
              and any(sources[j] == "train" for j in np.flatnonzero(group_ids == group_ids[i]))]
    if any(s == "test" for s in sources):
        per_class = {c: sum(1 for i in leaked if dataset.labels[i] == c) for c in CLASSES}
        n_test = sum(1 for s in sources if s == "test")
        click.echo(f"{len(leaked)} of {n_test} Testing images have a near-duplicate in Training: "
                   f"{per_class}")
    for title, listing in (("Label conflicts", conflicts), ("Largest groups", groups)):
        click.echo(f"\n{title}:")
        for group in listing[:show]:
            click.echo(f"  group of {len(group.members)}:")
            for i in group.members:
                click.echo(f"    {dataset.labels[i]:>10}  {dataset.paths[i]}")
    if dataset.errors:
        click.echo(f"\n{len(dataset.errors)} unreadable files:")
        for path, why in list(dataset.errors.items())[:show]:
            click.echo(f"  {path}: {why}")



@cli.command("docs", with_appcontext=False)
@click.option("--check", is_flag=True,
              help="Write nothing; list the generated files that differ and exit 1 if any do.")
def docs_command(check: bool) -> None:
    """Write the model cards (docs/models/) and the figures in README.md and docs/ from the
    models' metadata and reports/*.json. Re-run after every train, calibrate or evaluate."""
    from .training import cards

    if check:
        stale = cards.stale_files(PROJECT_ROOT)
        for path in stale:
            click.echo(f"stale: {path}")
        if stale:
            raise click.ClickException(f"{len(stale)} generated file(s) differ; run: "
                                       f"{cards.GENERATOR_COMMAND}")
        click.echo("Model cards and figures are up to date.")
        return
    written = cards.write_all(PROJECT_ROOT)
    for path in written:
        click.echo(f"wrote {path}")
    click.echo(f"{len(written)} file(s) changed." if written else "Nothing changed.")


@cli.command("build-cache", with_appcontext=False)
@click.option("--force", is_flag=True, help="Rebuild caches that are already valid.")
def build_cache_command(force: bool) -> None:
    """Build the ONNX copies the workers serve from (gunicorn's start does this when missing).

    One per served model, in BRAINMRI_CACHE_DIR (default ~/.cache/brainmri), named after the
    .h5's sha256 and checked against Keras; run it at image build time so that no start pays it.
    """
    from .inference import onnxengine
    from .preflight import ensure_cache
    from .preflight import served_cards

    try:
        cards = served_cards()
    except ModelError as exc:
        raise click.ClickException(str(exc)) from exc
    for card in cards:
        try:
            record, built = ensure_cache(card, force=force)
        except ModelError as exc:
            click.echo(f"{card.model_path.name}: {exc}")
            continue
        except OSError as exc:  # the same folder for every model: no point going on
            raise click.ClickException(
                f"the ONNX cache folder {onnxengine.cache_dir()} cannot be written ({exc}); "
                "set BRAINMRI_CACHE_DIR to a writable folder") from exc
        state = (f"built, largest difference from Keras {record['max_difference']:.1e}"
                 if built else "already valid")
        click.echo(f"{card.model_path.name}: {record['folder']} ({state})")


@cli.command("export", with_appcontext=False)
@click.option("--model", "model_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help=_MODEL_HELP)
@click.option("--format", "fmt", type=click.Choice(["savedmodel", "onnx"]), required=True,
              help="savedmodel: a folder for TF Serving; onnx: a file for Triton or onnxruntime.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Where to write it (a new folder, e.g. exports/brainmri/1, or a .onnx file); "
                   "the metadata JSON goes beside it.")
@click.option("--opset", default=17, show_default=True, help="ONNX opset (onnx only).")
def export_command(model_path: Path | None, fmt: str, out: Path, opset: int) -> None:
    """Export a model: preprocessed (N, size, size, 1) float32 in [0, 1] in, softmax out.

    Classes, input size, preprocessing version and temperature are written to a JSON beside
    the export; preprocessing, temperature scaling and the out-of-distribution guard stay
    with the caller.
    """
    from .inference import export

    if fmt == "onnx" and out.suffix != ".onnx":
        raise click.BadParameter("an ONNX export is a file ending in .onnx", param_hint="--out")
    try:
        result = export.export_model(_model_or_default(model_path), fmt, out, opset=opset)
    except (ModelError, FileExistsError) as exc:
        raise click.ClickException(str(exc)) from exc
    meta = result.metadata
    click.echo(f"Wrote {result.path} ({meta['format']}, {meta['model']['name']}: "
               f"{meta['input']['name']} {meta['input']['shape']} -> {meta['output']['name']} "
               f"{meta['output']['shape']}) and {result.metadata_path}")
    click.echo(f"Largest difference from Keras on {meta['check']['inputs']} check inputs: "
               f"{result.max_abs_diff:.2e}; temperature {meta['calibration']['temperature']:g} "
               f"(apply it to the output), preprocessing version {meta['preprocessing']['version']}")


def _predict_with_ray(files: list[Path], model: Path, csv_path: Path, batch_size: int,
                      threshold: float, guard: bool, address: str | None) -> Counter[str]:
    """The Ray engine (inference/raybatch.py): the same chunks and rows, scored by Ray tasks and actors."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:  # the optional "ray" extra
        raise click.ClickException("--engine ray needs Ray: uv sync --extra ray")
    from .inference import raybatch

    counts: Counter[str] = Counter()
    with csv_path.open("w", newline="", encoding="utf-8") as handle, \
            _progress_bar(len(files), "Classifying (Ray)") as bar:
        writer = csv.writer(handle)
        writer.writerow(PREDICT_COLUMNS)
        for chunk in raybatch.predict_chunks(files, model, batch_size, threshold, guard=guard,
                                             address=address):
            for result in chunk:
                writer.writerow(result.row)
                counts[result.kind] += 1
                counts["uncertain"] += int(result.uncertain)
            handle.flush()
            bar.update(len(chunk))
    return counts
