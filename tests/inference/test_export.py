"""`brainmri export`: SavedModel and ONNX match Keras on real slices, with metadata beside them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from brainmri.cli import cli
from brainmri.config import DEFAULTS
from brainmri.inference.export import TOLERANCE
from brainmri.inference.export import export_metadata_path
from brainmri.imaging import PREPROCESSING_VERSION
from brainmri.imaging import load_scan

from conftest import require_real_data

CNN = Path(DEFAULTS["BRAINMRI_MODEL_DIR"]) / "brainmri_cnn.h5"


def test_metadata_goes_beside_the_export():
    """model.onnx -> model.json; a SavedModel folder dir/1 -> dir/1.json (not a TF Serving version)."""
    assert export_metadata_path(Path("out/brainmri_cnn.onnx")) == Path("out/brainmri_cnn.json")
    assert export_metadata_path(Path("models/brainmri/1")) == Path("models/brainmri/1.json")


def test_cli_refuses_an_existing_output(tmp_path):
    """An export never writes over something that is already there."""
    model = tmp_path / "m.h5"
    model.write_bytes(b"unused")
    out = tmp_path / "export"
    out.mkdir()
    result = CliRunner().invoke(cli, ["export", "--model", str(model), "--format", "savedmodel",
                                      "--out", str(out)])
    assert result.exit_code != 0 and "exists" in result.output


def test_cli_wants_an_onnx_file_name(tmp_path):
    """--format onnx writes one file, named .onnx (Triton's onnxruntime backend looks for it)."""
    model = tmp_path / "m.h5"
    model.write_bytes(b"unused")
    result = CliRunner().invoke(cli, ["export", "--model", str(model), "--format", "onnx",
                                      "--out", str(tmp_path / "model")])
    assert result.exit_code != 0 and ".onnx" in result.output


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    """A consistent copy of model/brainmri_cnn.h5 (it may be retrained meanwhile), loaded."""
    from brainmri.inference.export import snapshot_model
    from brainmri.inference import Predictor

    if not CNN.is_file():
        pytest.skip(f"{CNN} is not there (train it first)")
    predictor = Predictor.from_path(snapshot_model(CNN, tmp_path_factory.mktemp("cnn")))
    predictor.load()
    return predictor


@pytest.fixture(scope="module")
def real_batch(cnn) -> np.ndarray:
    """Real slices from the data set's Testing folder, two per class, preprocessed as served."""
    root = require_real_data()
    paths = [path for folder in sorted((root / "Testing").iterdir()) if folder.is_dir()
             for path in sorted(folder.glob("*.jpg"))[:2]]
    assert len(paths) >= 8
    return np.stack([load_scan(path.read_bytes(), cnn.input_size) for path in paths])


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
@pytest.mark.parametrize("fmt", ["savedmodel", "onnx"])
def test_export_matches_keras_on_real_slices(fmt, cnn, real_batch, tmp_path):
    """The exported graph gives Keras's softmax within 1e-5 on real preprocessed slices."""
    from brainmri.inference.export import export_model
    from brainmri.inference.export import load_export

    out = tmp_path / ("brainmri_cnn.onnx" if fmt == "onnx" else "brainmri_cnn/1")
    result = export_model(cnn.card.model_path, fmt, out)
    assert out.exists() and result.metadata_path == export_metadata_path(out)
    exported = load_export(out, fmt)(real_batch)
    keras = cnn.predict_arrays(real_batch)
    assert exported.shape == keras.shape == (len(real_batch), len(cnn.labels))
    assert float(np.max(np.abs(exported - keras))) <= 1e-5
    assert np.allclose(exported.sum(axis=1), 1.0, atol=1e-5)  # softmax, not logits
    # Any batch size: the input's first dimension is free.
    assert np.allclose(load_export(out, fmt)(real_batch[:1]), keras[:1], atol=1e-5)

    meta = json.loads(result.metadata_path.read_text())
    assert meta["format"] == fmt
    assert meta["classes"] == list(cnn.labels)  # output order
    assert meta["input"]["size"] == cnn.input_size and meta["input"]["channels"] == 1
    assert meta["input"]["shape"] == [None, cnn.input_size, cnn.input_size, 1]
    assert meta["preprocessing"]["version"] == PREPROCESSING_VERSION
    assert meta["calibration"]["temperature"] == pytest.approx(cnn.temperature)
    assert meta["model"]["sha256"] == cnn.card.sha256
    assert TOLERANCE == 1e-5 and meta["check"]["max_abs_diff_vs_keras"] <= TOLERANCE
