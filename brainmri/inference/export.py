"""Export a served model for TF Serving (SavedModel) or Triton / onnxruntime (ONNX).

Both exports hold one function: the preprocessed slice batch ``image`` (N, size, size, 1) float32
in [0, 1], as `brainmri.imaging.load_scan` makes it, in; the model's softmax ``probabilities``
(N, classes), before temperature scaling, out. What stays outside the graph, in whoever calls it,
is written beside the export as JSON: the class order, the input size, the preprocessing version
and steps, the fitted temperature and "uncertain" threshold. The out-of-distribution guard is not
in the graph either (it reads the file's colour and pooled features), so a server that runs only
the export answers for anything it is sent; see docs/deployment.md "Scaling out".

ONNX goes through tf2onnx (the ``export`` extra: ``uv sync --extra export``), converting the
same traced function that the SavedModel serves, so both have identical inputs and outputs.
tf2onnx 1.17 converts TF 2.21 / Keras 3.15 models directly (``from_function``; ``from_keras``
works too but was written for tf.keras 2, so the function route is the one that does not depend
on Keras internals). Every export is checked against Keras before it is reported: the largest
absolute difference on a few inputs is recorded in the metadata, and an export that differs by
more than `TOLERANCE` is refused.

TensorFlow is imported inside the functions, as in predictor.py.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..imaging import PREPROCESSING
from .modelcard import ModelError
from .modelcard import metadata_path_for
from .modelcard import linked_files
from .modelcard import read_model_card

__all__ = [
    "FORMATS",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "TOLERANCE",
    "ExportResult",
    "export_metadata_path",
    "export_model",
    "load_export",
    "snapshot_model",
]

FORMATS = ("savedmodel", "onnx")
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
DEFAULT_OPSET = 17  # ONNX IR 8: onnxruntime >= 1.14 and Triton's onnxruntime backend read it
# Float32 softmax through two runtimes: kernels differ in summation order, not in maths.
TOLERANCE = 1e-5
_CHECK_INPUTS = 8


@dataclass(frozen=True)
class ExportResult:
    """What `export_model` wrote and how close it is to Keras."""

    path: Path
    metadata_path: Path
    max_abs_diff: float
    metadata: dict[str, Any]


def export_metadata_path(out: Path) -> Path:
    """The JSON beside an export: ``model.onnx`` -> ``model.json``, ``dir/1`` -> ``dir/1.json``."""
    out = Path(out)
    # A SavedModel is a folder; TF Serving only reads its numeric version folders, so a
    # sibling file is never mistaken for a version.
    return out.with_suffix(".json") if out.suffix == ".onnx" else out.with_name(out.name + ".json")


def snapshot_model(model_path: Path, into: Path, attempts: int = 3) -> Path:
    """Copy a model and its metadata into `into` and validate the copy (sha256 included).

    Training may rewrite ``model/`` while an export runs; a copy that matches its own metadata
    is one consistent model, whatever happens to the original afterwards.

    Raises:
        ModelError: the copy never matched its metadata, or the model is missing.
    """
    model_path = Path(model_path)
    read_model_card(model_path, verify_sha256=False)  # clear message for a missing model
    copy = Path(into) / model_path.name
    error: ModelError | None = None
    for _ in range(attempts):
        shutil.copyfile(metadata_path_for(model_path), metadata_path_for(copy))
        shutil.copyfile(model_path, copy)
        for name in linked_files(model_path):  # the guard network its metadata names
            (copy.parent / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(model_path.parent / name, copy.parent / name)
        try:
            read_model_card(copy)
            return copy
        except ModelError as exc:  # caught mid-rewrite: copy again
            error = exc
    raise ModelError(f"{model_path.name} kept changing while it was copied: {error}")


def _serving_function(model, size: int, channels: int):
    """The traced function both formats hold: image batch in, softmax out, named."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec((None, size, size, channels), tf.float32,
                                                name=INPUT_NAME)])
    def serve(image):
        return {OUTPUT_NAME: model(image, training=False)}

    return serve


def _write_savedmodel(model, size: int, channels: int, out: Path) -> None:
    """SavedModel with one signature, serving_default: {image} -> {probabilities}."""
    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(model)
    spec = tf.TensorSpec((None, size, size, channels), tf.float32, name=INPUT_NAME)
    # The first endpoint also becomes serving_default, the signature TF Serving calls.
    archive.add_endpoint("serve", lambda image: {OUTPUT_NAME: model(image, training=False)},
                         input_signature=[spec])
    archive.write_out(str(out), verbose=False)


def _require_tf2onnx() -> None:
    """Fail before loading anything when the ``export`` extra is not installed."""
    import importlib.util

    if importlib.util.find_spec("tf2onnx") is None:
        raise ModelError("ONNX export needs tf2onnx: uv sync --extra export "
                         "(or pip install 'brainmri[export]').")


def _write_onnx(model, size: int, channels: int, out: Path, opset: int) -> str:
    """ONNX of the same function through tf2onnx; returns the tf2onnx version."""
    import tf2onnx

    serve = _serving_function(model, size, channels)
    tf2onnx.convert.from_function(serve, input_signature=serve.input_signature, opset=opset,
                                  output_path=str(out))
    return tf2onnx.__version__


def load_export(path: Path, fmt: str) -> Callable[[np.ndarray], np.ndarray]:
    """A function running an export on a float32 batch (N, size, size, 1), returning softmax.

    SavedModel runs in TensorFlow, ONNX in onnxruntime (a dev dependency; Triton runs the same
    file with its onnxruntime backend).
    """
    path = Path(path)
    if fmt == "savedmodel":
        import tensorflow as tf

        signature = tf.saved_model.load(str(path)).signatures["serving_default"]
        return lambda batch: np.asarray(
            signature(**{INPUT_NAME: tf.constant(batch, tf.float32)})[OUTPUT_NAME])
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda batch: session.run([OUTPUT_NAME], {INPUT_NAME: np.asarray(batch, np.float32)})[0]
    raise ValueError(f"format must be one of {FORMATS}: {fmt!r}")


def _check_inputs(size: int, channels: int, count: int = _CHECK_INPUTS) -> np.ndarray:
    """Seeded inputs in the model's range: a black slice, a white one, and uniform noise."""
    rng = np.random.default_rng(17)
    batch = rng.random((count, size, size, channels), dtype=np.float32)
    batch[0] = 0.0
    batch[1] = 1.0
    return batch


def _metadata(card, fmt: str, out: Path, max_abs_diff: float | None,
              versions: dict[str, str], opset: int | None) -> dict[str, Any]:
    """What a client of the export must know: classes, input, preprocessing, calibration."""
    calibration = card.raw.get("calibration") or {}
    size, channels = card.input_size, card.channels
    return {
        "format": fmt,
        "path": out.name,
        "model": {**card.summary, "source": card.model_path.name},
        # Output index i is classes[i].
        "classes": list(card.classes),
        "input": {"name": INPUT_NAME, "shape": [None, size, size, channels], "dtype": "float32",
                  "range": [0.0, 1.0], "size": size, "channels": channels},
        "output": {"name": OUTPUT_NAME, "shape": [None, len(card.classes)], "dtype": "float32",
                   "meaning": "softmax of the model, before temperature scaling"},
        "preprocessing": dict(PREPROCESSING),  # "version": PREPROCESSING_VERSION, and the steps
        "calibration": {
            # p = softmax(log(probabilities) / temperature), as brainmri.inference.calibration does.
            "temperature": float(calibration.get("temperature", 1.0)),
            "fitted": "temperature" in calibration,
            "uncertain_below": calibration.get("uncertain_below"),
        },
        "not_in_graph": ["preprocessing (brainmri.imaging.load_scan)", "temperature scaling",
                         "out-of-distribution guard (brainmri.inference.ood)", "uncertain flag"],
        "check": {"inputs": _CHECK_INPUTS, "max_abs_diff_vs_keras": max_abs_diff,
                  "tolerance": TOLERANCE},
        **({"opset": opset} if opset is not None else {}),
        "exported_with": versions,
    }


def export_model(model_path: Path, fmt: str, out: Path, opset: int = DEFAULT_OPSET) -> ExportResult:
    """Export `model_path` as `fmt` to `out`, check it against Keras, write its metadata.

    Raises:
        ModelError: the model cannot be read, tf2onnx is missing, or the export differs from
            Keras by more than TOLERANCE (then nothing is left at `out`).
        FileExistsError: `out` (or its metadata file) already exists.
        ValueError: unknown format.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}: {fmt!r}")
    out = Path(out)
    meta_path = export_metadata_path(out)
    for existing in (out, meta_path):
        if existing.exists():
            raise FileExistsError(f"{existing} exists; remove it or choose another --out.")
    if fmt == "onnx":
        _require_tf2onnx()
    out.parent.mkdir(parents=True, exist_ok=True)
    from .predictor import Predictor

    with tempfile.TemporaryDirectory(prefix="brainmri-export-") as tmp:
        predictor = Predictor.from_path(snapshot_model(model_path, Path(tmp)))
        model = predictor.keras_model  # loads, checks shapes against the metadata, warms up
        card = predictor.card
        import keras
        import tensorflow as tf

        versions = {"tensorflow": tf.__version__, "keras": keras.__version__}
        # Written to a temporary sibling, then moved: a failed check leaves nothing behind.
        staging = Path(tmp) / ("staged" + out.suffix)
        if fmt == "savedmodel":
            _write_savedmodel(model, card.input_size, card.channels, staging)
        else:
            versions["tf2onnx"] = _write_onnx(model, card.input_size, card.channels, staging, opset)
        batch = _check_inputs(card.input_size, card.channels)
        diff = float(np.max(np.abs(load_export(staging, fmt)(batch) - predictor.predict_arrays(batch))))
        if not diff <= TOLERANCE:  # also refuses NaN
            raise ModelError(f"The {fmt} export differs from Keras by {diff:.3g} "
                             f"(tolerance {TOLERANCE:g}); nothing was written.")
        shutil.move(str(staging), str(out))
    metadata = _metadata(card, fmt, out, diff, versions, opset if fmt == "onnx" else None)
    meta_path.write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    return ExportResult(out, meta_path, diff, metadata)
