"""Sagittal and coronal reformats of axial stacks: grouping, geometry, and the shipped guard on them.

The geometry tests build a small synthetic head; the last test reads LGG held-out patients from
../shared/data/lgg (or $BRAINMRI_LGG_DATA), skipping with the reason when it is missing, except
under CI=true, where it fails.
"""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from brainmri.config import DEFAULTS
from brainmri.training import reformats

from conftest import require_lgg_data


def _head(slices: int = 24, side: int = 64) -> np.ndarray:
    """An axial stack (slice 1 at the bottom) of a grey ellipsoid head with a bright chin blob."""
    z, y, x = np.mgrid[:slices, :side, :side].astype(np.float32)
    head = ((z - slices / 2) / (slices / 2.2)) ** 2 + ((y - side / 2) / (side / 2.5)) ** 2 \
        + ((x - side / 2) / (side / 3)) ** 2 <= 1
    volume = np.where(head, 120.0, 0.0)
    volume[: slices // 4][head[: slices // 4]] = 250.0  # the bottom quarter, bright
    return volume.astype(np.uint8)


def _write(folder: Path, case: str, sequence: str, indices, volume: np.ndarray) -> None:
    for i in indices:
        cv2.imwrite(str(folder / f"{case}_{i}_{sequence}.png"), volume[i - 1])


def test_numbered_slices_group_into_gapless_volumes(tmp_path):
    volume = _head()
    _write(tmp_path, "TCGA_AA_0001_20000101", "flair", range(1, 25), volume)
    _write(tmp_path, "TCGA_AA_0001_20000101", "t1", [i for i in range(1, 25) if i != 7], volume)
    _write(tmp_path, "TCGA_AA_0002_20000101", "flair", range(1, 6), volume)  # too short
    (tmp_path / "gg (1).jpg").write_bytes(b"not a numbered slice")
    found = reformats.stacks(sorted(tmp_path.iterdir()))
    assert list(found) == [("TCGA_AA_0001_20000101", "flair")]
    files = found[("TCGA_AA_0001_20000101", "flair")]
    assert [f.name for f in files[:3]] == [f"TCGA_AA_0001_20000101_{i}_flair.png" for i in (1, 2, 3)]


def test_a_reformat_stands_the_head_up_at_its_own_proportions():
    volume = _head()
    for plane in ("sagittal", "coronal"):
        cut = reformats.reformat(volume, plane, 0.5)
        assert cut.dtype == np.uint8 and cut.shape[0] == cut.shape[1] == 64
        rows = np.flatnonzero((cut > 60).any(axis=1))
        columns = np.flatnonzero((cut > 60).any(axis=0))
        # The bright bottom slices end up at the bottom of the picture.
        bright = np.flatnonzero((cut > 200).any(axis=1))
        assert bright.min() > rows.mean(), plane
        height, width = rows[-1] - rows[0] + 1, columns[-1] - columns[0] + 1
        if plane == "sagittal":  # front to back is the head's length
            assert height / width == pytest.approx(reformats.HEIGHT_RATIO, abs=0.08)
    with pytest.raises(ValueError):
        reformats.reformat(volume, "axial", 0.5)
    with pytest.raises(ValueError):
        reformats.reformat(np.zeros_like(volume), "coronal", 0.5)


def test_every_volume_gives_both_planes_at_every_position(tmp_path):
    _write(tmp_path, "TCGA_AA_0001_20000101", "flair", range(1, 25), _head())
    made = reformats.reformats(sorted(tmp_path.iterdir()))
    assert len(made) == 2 * len(reformats.POSITIONS)
    assert {r.plane for r in made} == {"sagittal", "coronal"}
    assert made[0].name == "TCGA_AA_0001_20000101_flair_sagittal_30.png"
    decoded = cv2.imdecode(np.frombuffer(made[0].png(), np.uint8), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(decoded, made[0].pixels)


def test_the_shipped_guard_accepts_held_out_patients_in_other_planes():
    """LGG is axial only: the served guard must not refuse the same held-out patients' brains cut
    sagittally or coronally (evaluate: 0 of all 480 test-patient reformats refused)."""
    from brainmri.inference import Predictor
    from brainmri.inference import classify_many

    root = require_lgg_data()
    model = Path(DEFAULTS["BRAINMRI_MODEL_DIR"]) / "brainmri_cnn.h5"
    manifest = json.loads(model.with_suffix(".splits.json").read_text())
    test = [root / p.split("/", 1)[1] for p in manifest["splits"]["test"] if p.startswith("lgg/")]
    patients = sorted({"_".join(p.name.split("_")[:3]) for p in test})[:4]
    chosen = [p for p in test if "_".join(p.name.split("_")[:3]) in patients]
    made = reformats.reformats(chosen)
    assert len(made) >= 4 * 2 * len(reformats.POSITIONS)
    predictor = Predictor.from_path(model)
    outcomes = classify_many(predictor, [r.png() for r in made], 0.6)
    refused = [r.name for r, o in zip(made, outcomes) if o.refused]
    assert len(refused) <= 0.02 * len(made), refused
