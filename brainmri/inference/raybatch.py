"""`brainmri predict --engine ray`: score an archive of files on Ray Data, locally or on a cluster.

The pipeline has the plain engine's chunks (``--batch-size`` files, in order) as rows:

1. Ray tasks read each chunk's files and preprocess them (`imaging.read_scan`, the served
   preprocessing, with the colour the guard checks from the same decode). They ask for half
   a CPU: preprocessing is partly file I/O, and a resource request unlike the model's keeps
   Ray from fusing the tasks into the model's actors.
2. A pool of actors, each holding the guarded predictor (loaded once per actor), classifies
   each chunk with `guarded.classify_prepared`, given the tasks' arrays, exactly as the plain
   engine does in one process: same chunks, one forward pass each, the same guard,
   calibration and "uncertain" threshold, so the same answers, and the CSV row is built by
   the same function. The actors run TensorFlow with the thread count the plain engine would
   use on the machine the command runs on (TF_NUM_INTRAOP_THREADS, else every core): with
   another count TensorFlow adds in another order and probabilities move in the 6th decimal.
   On a cluster of many-core nodes set TF_NUM_INTRAOP_THREADS=1 for both engines.
3. The driver writes the rows in file order as chunks finish (Ray Data's preserve_order).

The model travels through Ray's object store (the nodes need not see ``model/``); the files are
read where the tasks run, so on a cluster every node must see them at the same paths (a shared
file system). The nodes need this project's environment (``uv sync --extra ray`` from the same
uv.lock). Local by default: a Ray instance for this run on this machine, shut down afterwards;
``address`` joins a running cluster (``auto``, ``ray://head:10001``).
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..imaging import ImageError
from .guarded import Outcome

# Ray (>= 2.43) sees a driver started by `uv run` and, by default, ships the working directory
# (all of model/) to a fresh `uv run` environment for every worker: minutes of installing
# TensorFlow before the first file. Workers here use this interpreter and environment instead.
# Read when ray is first imported; set RAY_ENABLE_UV_RUN_RUNTIME_ENV=1 to have Ray's behaviour.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

__all__ = ["ChunkResult", "Scorer", "predict_chunks", "prepare_chunk"]

@dataclass(frozen=True)
class ChunkResult:
    """One scored file: its CSV row (guarded.PREDICT_COLUMNS), kind and uncertain flag."""

    row: list[str]
    kind: str  # "classified", "refused" or "unreadable", for the summary line
    uncertain: bool


def _encode_error(stage: str, error: Exception) -> str:
    """An exception as JSON text (Ray ships columns, and ImageError does not pickle)."""
    return json.dumps({
        "stage": stage,  # "read": never reached classify_many, as in the plain engine
        "type": type(error).__name__,
        "image_error": isinstance(error, ImageError),
        "code": getattr(error, "code", None),
        "message": getattr(error, "message", None) or str(error),
    })


def _decode_error(text: str) -> tuple[str, Exception]:
    """Rebuild what `Outcome` reads from an exception: ImageError code and message, or the type."""
    spec = json.loads(text)
    if spec["image_error"]:
        return spec["stage"], ImageError(spec["code"], spec["message"])
    # Outcome shows other errors by type name only ("... (FileNotFoundError)"), so that name
    # is what must survive; builtins (OSError and kin) come back as themselves.
    cls = getattr(builtins, spec["type"], None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return spec["stage"], cls(spec["message"])
        except TypeError:  # an exception type with a different constructor
            pass
    return spec["stage"], type(spec["type"], (Exception,), {})(spec["message"])


def prepare_chunk(row: dict[str, Any], size: int, max_pixels: int) -> dict[str, Any]:
    """Ray task: read and preprocess one chunk's files (one decode each: the network's input
    and the colour and peak brightness the guard checks); errors become that file's error text."""
    from ..imaging import read_scan

    paths = [str(path) for path in row["paths"]]
    images = np.zeros((len(paths), size, size, 1), np.float32)
    colours = np.zeros(len(paths), np.float64)
    peaks = np.full(len(paths), np.nan)  # NaN: not measured (16-bit PNG, scanner-unit DICOM)
    errors: list[str] = []
    for index, path in enumerate(paths):
        try:
            payload = Path(path).read_bytes()
        except OSError as exc:  # one unreadable file never ends the run
            errors.append(_encode_error("read", exc))
            continue
        try:
            scan = read_scan(payload, size, max_pixels=max_pixels)
        except Exception as exc:  # the plain engine isolates every decoding failure too
            errors.append(_encode_error("prepare", exc))
            continue
        images[index], colours[index] = scan.model_input, scan.colourfulness
        if scan.peak_brightness is not None:
            peaks[index] = scan.peak_brightness
        errors.append("")
    return {"chunk": row["chunk"], "paths": paths, "images": images, "colourfulness": colours,
            "peak_brightness": peaks, "errors": errors}


class Scorer:
    """Ray actor: the guarded predictor, loaded once, classifying one chunk per call."""

    def __init__(self, model: bytes, metadata: bytes, name: str, uncertain_below: float,
                 guard: bool, threads: int, linked: dict[str, bytes] | None = None) -> None:
        # The plain engine's thread count, set before TensorFlow starts: TensorFlow splits its
        # sums by thread, and another count changes probabilities in the 6th decimal.
        os.environ["TF_NUM_INTRAOP_THREADS"] = str(threads)
        from .modelcard import metadata_path_for
        from .predictor import Predictor

        self._dir = tempfile.TemporaryDirectory(prefix="brainmri-ray-")
        path = Path(self._dir.name) / name
        path.write_bytes(model)
        metadata_path_for(path).write_bytes(metadata)
        for relative, data in (linked or {}).items():  # the guard network the metadata names
            (path.parent / relative).parent.mkdir(parents=True, exist_ok=True)
            (path.parent / relative).write_bytes(data)
        self.predictor = Predictor.from_path(path)  # sha256 checked against the metadata
        self.predictor.load()
        self.uncertain_below = uncertain_below
        self.guard = guard

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Score every chunk of the batch (one, with batch_size=1); rows as JSON text."""
        from ..imaging import Scan
        from . import guarded

        results = []
        for paths, images, colours, peaks, errors in zip(
                batch["paths"], batch["images"], batch["colourfulness"], batch["peak_brightness"],
                batch["errors"]):
            outcomes: dict[int, Outcome] = {}
            read: list[int] = []
            prepared: list[Scan | Exception] = []
            for index, text in enumerate(errors):
                if text:
                    stage, error = _decode_error(str(text))
                    if stage == "read":
                        outcomes[index] = Outcome(error=error)
                        continue
                    prepared.append(error)
                else:
                    peak = float(peaks[index])
                    prepared.append(Scan(images[index], float(colours[index]),
                                         None if np.isnan(peak) else peak))
                read.append(index)
            classified = guarded.classify_prepared(
                self.predictor, prepared, self.uncertain_below, guard=self.guard, isolate=True)
            outcomes.update(zip(read, classified))
            rows = []
            for index, path in enumerate(paths):
                outcome = outcomes[index]
                kind = ("classified" if outcome.prediction is not None
                        else "refused" if outcome.refused else "unreadable")
                uncertain = bool(outcome.prediction is not None and outcome.prediction.uncertain)
                rows.append([guarded.csv_row(Path(str(path)), outcome), kind, uncertain])
            results.append(json.dumps(rows))
        return {"chunk": batch["chunk"], "rows": np.array(results, dtype=object)}


def _cores() -> int:
    """Cores this process may run on (TensorFlow's default thread count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on macOS
        return os.cpu_count() or 1


def _quiet_ray() -> None:
    """Ray Data's progress bars and INFO lines would bury the CLI's own progress bar."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.execution_options.preserve_order = True  # rows in file order, as the plain engine
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)


def predict_chunks(files: list[Path], model_path: Path, batch_size: int, uncertain_below: float,
                   guard: bool = True, address: str | None = None,
                   max_pixels: int | None = None) -> Iterator[list[ChunkResult]]:
    """Score `files` on Ray; yield each chunk's results (batch_size files) in file order.

    Args:
        files: the files, as `brainmri predict` found them.
        model_path: the .h5 (its metadata beside it); copied and checked before it is sent.
        batch_size: files per chunk, one forward pass each (the plain engine's --batch-size).
        uncertain_below: the "uncertain" threshold (the model's fitted one, else the default).
        guard: False turns the out-of-distribution guard off (--no-guard).
        address: a Ray cluster to join; None starts a local instance for this run.
        max_pixels: decoded-size limit (default: the server's BRAINMRI_MAX_PIXELS default).
    """
    import ray

    from .export import snapshot_model
    from ..imaging import DEFAULT_MAX_PIXELS
    from .modelcard import metadata_path_for
    from .modelcard import linked_files
    from .modelcard import read_model_card

    if not files:
        return
    with tempfile.TemporaryDirectory(prefix="brainmri-ray-model-") as tmp:
        copy = snapshot_model(model_path, Path(tmp))  # training may rewrite model/ meanwhile
        card = read_model_card(copy)
        model, metadata = copy.read_bytes(), metadata_path_for(copy).read_bytes()
        linked = {name: (copy.parent / name).read_bytes() for name in linked_files(copy)}
    started_here = not ray.is_initialized()
    if started_here:
        # "local" always starts a new instance here; None would join whatever RAY_ADDRESS names.
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
    try:
        _quiet_ray()
        import ray.data

        cpus = int(ray.cluster_resources().get("CPU", 1))
        # What `--engine plain` would use here: TF_NUM_INTRAOP_THREADS, else every core.
        threads = int(os.environ.get("TF_NUM_INTRAOP_THREADS") or 0) or _cores()
        chunks = [{"chunk": k, "paths": [str(p) for p in files[start : start + batch_size]]}
                  for k, start in enumerate(range(0, len(files), batch_size))]
        # One block per chunk, so every chunk can be prepared by its own task.
        dataset = ray.data.from_items(chunks, override_num_blocks=len(chunks))
        prepared = dataset.map(
            prepare_chunk, num_cpus=0.5,
            fn_kwargs={"size": card.input_size, "max_pixels": max_pixels or DEFAULT_MAX_PIXELS})
        # A model copy per actor: up to half the CPUs, the rest preparing files.
        scored = prepared.map_batches(
            Scorer, batch_size=1, num_cpus=1,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, cpus // 2)),
            fn_constructor_kwargs={"model": model, "metadata": metadata, "name": copy.name,
                                   "uncertain_below": uncertain_below, "guard": guard,
                                   "threads": threads, "linked": linked})
        for item in scored.iter_rows():
            yield [ChunkResult(row, kind, uncertain)
                   for row, kind, uncertain in json.loads(item["rows"])]
    finally:
        if started_here:
            ray.shutdown()
