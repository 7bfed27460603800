"""The guard's positives beyond the model's manifest: brain folders without labels, and
collections split by the guard with the split a classifier trained on them would get.

The last test reads SARTAJ, LGG and BraTS from ../shared/data, skipping with the reason when they
are missing, except under CI=true, where it fails.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from brainmri.training import guard_training
from brainmri.training import splits
from brainmri.training.dataset import CachedDataset
from brainmri.training.dataset import concatenate

from conftest import _missing_data
from conftest import REAL_DATA
from conftest import encode
from conftest import synthetic_slice


def test_unlabelled_slices_load_as_positives_with_their_case_as_patient(tmp_path):
    """`harvard_mri/` names slices `<folder>_<case><3-digit slice>`; the case is the patient,
    whatever folder of the atlas holds it, and no slice gets a class."""
    folder = tmp_path / "atlas_mri"
    folder.mkdir()
    for i, name in enumerate(["CT-MRI_16004.jpg", "CT-MRI_16006.jpg", "PET-MRI_16010.jpg",
                              "SPECT-MRI_2011.jpg", "notes_x.jpg"]):
        (folder / name).write_bytes(encode(synthetic_slice(96, i), ".jpg"))
    (folder / "README.md").write_text("not an image")
    data = guard_training.load_unlabelled(folder, 64)
    assert data.images.shape == (5, 64, 64, 1)
    assert set(data.labels) == {guard_training.UNLABELLED}
    by_file = dict(zip(data.paths, data.patients))
    assert by_file["atlas_mri/CT-MRI_16004.jpg"] == by_file["atlas_mri/PET-MRI_16010.jpg"] == "case 16"
    assert by_file["atlas_mri/SPECT-MRI_2011.jpg"] == "case 2"
    assert by_file["atlas_mri/notes_x.jpg"] == ""


def _toy(collection: str, patients: list[str]) -> CachedDataset:
    n = len(patients)
    images = np.full((n, 8, 8, 1), 0.5, np.float32)  # a head in view: not set aside as blank
    return CachedDataset({collection: Path(collection)}, images, ["glioma"] * n, ["train"] * n,
                         [f"{collection}/{i}.jpg" for i in range(n)],
                         np.arange(n, dtype=np.uint64), {}, ["t1"] * n, patients)


def test_completing_a_manifest_splits_only_the_collections_it_lacks_by_patient():
    known = _toy("known", [f"k{i}" for i in range(10)])
    new = _toy("new", [f"p{i // 5}" for i in range(100)])  # 20 patients, 5 slices each
    manifest = {"root": "known", "collections": ["known"], "seed": 42, "group_distance": 4,
                "splits": {"train": ["known/0.jpg"], "val": ["known/1.jpg"], "test": []}}
    both = concatenate([known, new])
    done = guard_training.complete_manifest(manifest, both)
    assert done["collections"] == ["known", "new"] and done["split_here"] == ["new"]
    assert done["splits"]["train"][0] == "known/0.jpg" and done["splits"]["val"][0] == "known/1.jpg"
    side = {path: name for name, paths in done["splits"].items() for path in paths}
    by_patient: dict[str, set[str]] = {}
    for path, patient in zip(new.paths, new.patients):
        by_patient.setdefault(patient, set()).add(side[path])
    assert all(len(where) == 1 for where in by_patient.values())
    assert {"train", "val", "test"} <= set(side[p] for p in new.paths)
    # The split a classifier trained on "new" alone, with the manifest's seed, gets.
    alone = splits.split_dataset(new, seed=42)
    assert [side[p] for p in new.paths] == alone.assignment.tolist()
    assert guard_training.complete_manifest(done, both) is done  # nothing left to split


@pytest.mark.slow
@pytest.mark.realdata
def test_brats_splits_the_same_alone_and_beside_the_other_collections():
    """Each collection is split on its own: BraTS loaded with SARTAJ and LGG (as the
    classifiers train) splits exactly as BraTS alone (as `complete_manifest` splits a
    collection a model's manifest lacks), so a guard never trains on a classifier's test
    patients."""
    from brainmri.training.dataset import load_datasets

    roots = [REAL_DATA, REAL_DATA.parent / "lgg", REAL_DATA.parent / "brats"]
    for root in roots:
        if not root.is_dir():
            _missing_data(f"{root} not found (the guard's brain collections)")
    together = load_datasets(roots, 128)
    brats = np.array(together.collections) == "brats"
    with_others = splits.split_dataset(together, seed=42).assignment[brats]
    alone = load_datasets(roots[-1:], 128)
    assert alone.paths == np.array(together.paths)[brats].tolist()
    assert splits.split_dataset(alone, seed=42).assignment.tolist() == with_others.tolist()
    assert {"train", "val", "test"} <= set(with_others.tolist())
