"""Real NIfTI volumes from ../shared/data/volumes (issue 34): axial slices cut by the affine.

Skipped when the volumes are missing, a failure under CI=true (conftest._missing_data).
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from brainmri.config import PROJECT_ROOT
from brainmri.imaging import read_nifti
from brainmri.imaging import read_study

from conftest import _missing_data

VOLUMES = Path(os.environ.get("BRAINMRI_VOLUMES_DATA",
                              PROJECT_ROOT.parent / "shared" / "data" / "volumes"))
BRATS = VOLUMES.parent / "brats"
LIMITS = (10**9, 1000, 10**9)


def volume(name: str) -> bytes:
    path = VOLUMES / name
    if not path.is_file():
        _missing_data(f"real volume {name} not found in {VOLUMES} (set BRAINMRI_VOLUMES_DATA)")
    return path.read_bytes()


@pytest.mark.parametrize("z", [60, 70, 80, 90])
def test_brats_mask_volume_slices_match_the_exported_masks(z):
    """The LPS-stored BraTS mask, cut by the affine, is pixel for pixel the exported PNG mask
    of the same axial index (anterior up, patient's right on the image's left)."""
    mask = read_nifti(volume("Brats18_TCIA02_471_tumour_mask.nii.gz"), *LIMITS)
    assert mask.orientation == "LPS" and len(mask.slices) == 155
    exported = BRATS / "masks" / f"Brats18_TCIA02_471_1_{z}.png"
    if not exported.is_file():
        _missing_data(f"{exported} not found")
    np.testing.assert_array_equal(mask.slices[z] > 0, cv2.imread(str(exported), 0) > 0)


def test_brats_flair_study_has_blank_ends_and_scores_the_middle():
    study = read_study([("v.nii.gz", volume("Brats18_TCIA02_471_flair.nii.gz"))], 128)
    assert study.kind == "nifti" and len(study.slices) == 155
    blank = [s.index for s in study.slices if s.blank]
    assert blank[0] == 0 and blank[-1] == 154
    assert all(not s.blank for s in study.slices[40:120])
    assert all(s.scan.model_input.shape == (128, 128, 1) for s in study.slices if not s.blank)


def test_clinical_volumes_in_two_grids():
    """The two TCGA_FG_6692 volumes differ in grid; both are cut along their axial axis."""
    t1c = read_nifti(volume("TCGA_FG_6692_t1c.nii.gz"), *LIMITS)
    t2 = read_nifti(volume("TCGA_FG_6692_t2.nii.gz"), *LIMITS)
    assert t1c.orientation == t2.orientation == "LAS"
    assert len(t1c.slices) == len(t2.slices) == 26
    # Rows run anterior-posterior, columns left-right, as the affine says for each grid.
    assert t1c.slices[0].shape == (224, 256) and t2.slices[0].shape == (256, 224)
