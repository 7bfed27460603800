"""`brainmri predict` with NIfTI volumes (one row per slice) and `--by-study` (issue 34)."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from brainmri.cli import cli
from brainmri.inference import PREDICT_COLUMNS
from brainmri.inference.studyfiles import STUDY_SUMMARY_COLUMNS

from conftest import encode
from conftest import synthetic_slice
from test_predict_cli import fake  # noqa: F401  (fixture)
from test_predict_cli import model_file  # noqa: F401  (fixture)


def head_volume(depth: int = 10, side: int = 48) -> np.ndarray:
    """An ellipsoid head whose first and last axial slices are empty."""
    x, y, z = np.meshgrid(np.linspace(-1, 1, side), np.linspace(-1, 1, side),
                          np.linspace(-1, 1, depth), indexing="ij")
    inside = x**2 / 0.6 + y**2 / 0.8 + z**2 / 0.7 < 1
    return np.where(inside, 300.0 * (1.5 + x), 0.0).astype(np.float32)


def write_volume(path: Path, gz: bool = True) -> Path:
    import nibabel as nib

    data = nib.Nifti1Image(head_volume(), np.eye(4)).to_bytes()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def test_volume_rows_have_a_slice_index(fake, model_file, tmp_path):  # noqa: F811
    volume = write_volume(tmp_path / "head.nii.gz")
    png = tmp_path / "one.png"
    png.write_bytes(encode(synthetic_slice(96, 1)))
    out = tmp_path / "out.csv"
    result = CliRunner().invoke(cli, ["predict", str(volume), str(png), "--model", model_file,
                                      "--csv", str(out)])
    assert result.exit_code == 0, result.output
    rows = read_csv(out)
    assert rows[0] == [*PREDICT_COLUMNS, "slice"]
    body = [dict(zip(rows[0], row)) for row in rows[1:]]
    assert body[0]["path"].endswith("one.png") and body[0]["slice"] == ""
    slices = [row for row in body if row["path"].endswith("head.nii.gz")]
    assert [row["slice"] for row in slices] == [str(i) for i in range(10)]
    assert "Blank" in slices[0]["reason"] and slices[0]["label"] == ""
    assert slices[5]["label"] != ""


def test_without_volumes_the_columns_are_unchanged(fake, model_file, tmp_path):  # noqa: F811
    png = tmp_path / "one.png"
    png.write_bytes(encode(synthetic_slice(96, 1)))
    out = tmp_path / "out.csv"
    CliRunner().invoke(cli, ["predict", str(png), "--model", model_file, "--csv", str(out)])
    assert read_csv(out)[0] == PREDICT_COLUMNS


def test_by_study_one_row_per_volume_and_folder(fake, model_file, tmp_path):  # noqa: F811
    root = tmp_path / "studies"
    (root / "patient_a").mkdir(parents=True)
    (root / "patient_b").mkdir()
    for i in range(3):
        (root / "patient_a" / f"s_{i}.png").write_bytes(encode(synthetic_slice(96, i)))
    (root / "patient_b" / "s_1.png").write_bytes(encode(synthetic_slice(96, 7)))
    write_volume(root / "vol.nii", gz=False)
    out = tmp_path / "studies.csv"
    result = CliRunner().invoke(cli, ["predict", str(root), "--by-study", "--model", model_file,
                                      "--csv", str(out)])
    assert result.exit_code == 0, result.output
    rows = read_csv(out)
    assert rows[0] == STUDY_SUMMARY_COLUMNS
    by_name = {Path(row[0]).name: dict(zip(rows[0], row)) for row in rows[1:]}
    assert set(by_name) == {"vol.nii", "patient_a", "patient_b"}
    assert by_name["patient_a"]["slices"] == "3" and by_name["patient_a"]["kind"] == "slices"
    assert by_name["vol.nii"]["kind"] == "nifti" and int(by_name["vol.nii"]["blank"]) >= 2
    assert by_name["vol.nii"]["label"] in ("tumor", "no_tumor")
