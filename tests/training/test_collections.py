"""Several collections: sequences and patients from file names, patient-disjoint splits,
balanced sampling, per-sequence metrics, the held-out default rule and mask alignment (no TF)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from brainmri.inference import registry
from brainmri.training.dataset import load_datasets
from brainmri.training.dataset import sequence_of
from brainmri.training.evaluation import by_sequence
from brainmri.training.evaluation import eval_sets
from brainmri.training.metrics import binary_metrics
from brainmri.imaging import preprocess
from brainmri.imaging import resize_mask
from brainmri.inference import CLASSES
from brainmri.training.splits import manifest_splits
from brainmri.training.splits import split_dataset

from conftest import encode
from conftest import synthetic_slice


def _lgg_like(root, patients: int = 8, slices: int = 4):
    """A tiny `lgg/`-style collection: glioma/ and no_tumor/, three sequences, slices.csv, masks."""
    (root / "glioma").mkdir(parents=True)
    (root / "no_tumor").mkdir()
    (root / "masks").mkdir()
    rows = ["slice,patient,case,institution,label,mask_pixels,sequences"]
    for p in range(patients):
        patient = f"TCGA_AB_{1000 + p}"
        for k in range(slices):
            slice_id = f"{patient}_20000101_{k}"
            label = "glioma" if k % 2 else "no_tumor"
            image = synthetic_slice(64, seed=p * 10 + k)
            for sequence in ("t1", "flair", "t1c"):
                (root / label / f"{slice_id}_{sequence}.png").write_bytes(encode(image))
            if label == "glioma":
                mask = np.zeros((64, 64), np.uint8)
                mask[20:30, 20:30] = 255
                (root / "masks" / f"{slice_id}.png").write_bytes(encode(mask))
            rows.append(f"{slice_id},{patient},{patient}_20000101,AB,{label},100,t1 flair t1c")
    (root / "slices.csv").write_text("\n".join(rows) + "\n")
    return root


def _scan(seed: int, size: int = 64) -> np.ndarray:
    """A synthetic 'head' whose random blobs make every seed a different pHash group."""
    rng = np.random.default_rng(seed)
    image = np.zeros((size, size), np.uint8)
    cv2.ellipse(image, (size // 2, size // 2), (size // 3, size // 2 - 6), 0, 0, 360, 120, -1)
    for _ in range(6):
        centre = tuple(int(v) for v in rng.integers(size // 4, 3 * size // 4, 2))
        cv2.circle(image, centre, int(rng.integers(3, 10)), int(rng.integers(150, 255)), -1)
    return image


def _sartaj_like(root, per_class: int = 14):
    for c, name in enumerate(CLASSES):
        for split in ("Training", "Testing"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class if split == "Training" else 2):
                seed = 1000 + c * 100 + i + (50 if split == "Testing" else 0)
                (folder / f"img ({i}).png").write_bytes(encode(_scan(seed)))
    return root


@pytest.fixture
def two_collections(tmp_path):
    return _sartaj_like(tmp_path / "sartaj"), _lgg_like(tmp_path / "lgg")


def test_sequence_and_patient_come_from_the_names(two_collections, tmp_path):
    data = load_datasets(list(two_collections), 32, cache_dir=tmp_path / "cache")
    assert set(data.collections) == {"sartaj", "lgg"}
    lgg = [i for i, c in enumerate(data.collections) if c == "lgg"]
    assert {data.sequences[i] for i in lgg} == {"t1", "flair", "t1c"}
    assert {data.patients[i] for i in lgg} == {f"TCGA_AB_{1000 + p}" for p in range(8)}
    sartaj = [i for i, c in enumerate(data.collections) if c == "sartaj"]
    assert {data.sequences[i] for i in sartaj} == {"unspecified"}
    assert {data.patients[i] for i in sartaj} == {""}
    # Paths name the collection, and every row finds its file again.
    assert all(p.startswith(("sartaj/", "lgg/")) for p in data.paths)
    assert all(data.file(i).is_file() for i in range(len(data.paths)))
    assert sequence_of(tmp_path / "x_11_flair.jpg") == "flair"
    assert sequence_of(tmp_path / "gg (3).jpg") == "unspecified"


def test_roots_must_have_different_names(tmp_path):
    a = _sartaj_like(tmp_path / "a" / "data")
    b = _sartaj_like(tmp_path / "b" / "data")
    with pytest.raises(ValueError, match="different folder names"):
        load_datasets([a, b], 32, cache_dir=tmp_path / "cache")


def test_split_keeps_every_patient_on_one_side(two_collections, tmp_path):
    data = load_datasets(list(two_collections), 32, cache_dir=tmp_path / "cache")
    plan = split_dataset(data, seed=3)
    sides: dict[str, set[str]] = {}
    for i, patient in enumerate(data.patients):
        if patient:
            sides.setdefault(patient, set()).add(plan.assignment[i])
    assert all(len(s) == 1 for s in sides.values())
    assert {next(iter(s)) for s in sides.values()} >= {"train", "test"}
    # A collection's split does not depend on which other collections are loaded with it.
    alone = load_datasets([two_collections[1]], 32, cache_dir=tmp_path / "cache")
    alone_plan = split_dataset(alone, seed=3)
    together = {p: a for p, a in zip(data.paths, plan.assignment) if p.startswith("lgg/")}
    assert together == dict(zip(alone.paths, alone_plan.assignment))


def test_balanced_stream_draws_every_cell_alike():
    pytest.importorskip("tensorflow")  # training imports it lazily; the helper is NumPy only
    from brainmri.training.trainer import balanced_cells
    from brainmri.training.trainer import balanced_stream
    from brainmri.training.trainer import balanced_weights
    from brainmri.training.trainer import cell_shares

    labels = np.array([0] * 90 + [2] * 10 + [0] * 5 + [1] * 45)
    collections = ["a"] * 100 + ["b"] * 50
    cells = balanced_cells(labels, collections)
    assert sorted(len(c) for c in cells) == [5, 10, 45, 90]
    stream = balanced_stream(cells, 4000, seed=0)
    keys = Counter_of(stream, labels, collections)
    assert set(keys.values()) == {1000}
    weights = balanced_weights(labels, collections)
    totals = {k: weights[[i for i in range(150) if (collections[i], labels[i]) == k]].sum()
              for k in keys}
    np.testing.assert_allclose(list(totals.values()), 150 / 4, rtol=1e-5)
    # "collection": a and b draw half each, each collection's classes evenly.
    shares = cell_shares(cells, collections, "collection")
    keys = Counter_of(balanced_stream(cells, 4000, seed=0, shares=shares), labels, collections)
    assert keys[("a", 0)] == keys[("a", 2)] == 1000
    assert keys[("b", 0)] == keys[("b", 1)] == 1000
    unequal = ["a"] * 100 + ["b"] * 40 + ["c"] * 10
    labels3 = np.array([0] * 50 + [1] * 50 + [0] * 20 + [1] * 20 + [0] * 10)
    cells3 = balanced_cells(labels3, unequal)
    keys = Counter_of(balanced_stream(cells3, 6000, 1, cell_shares(cells3, unequal, "collection")),
                      labels3, unequal)
    assert keys[("c", 0)] == 2000 and keys[("a", 0)] == keys[("b", 1)] == 1000


def Counter_of(stream, labels, collections):
    from collections import Counter

    return Counter((collections[i], int(labels[i])) for i in stream)


def test_binary_and_per_sequence_metrics():
    no, glioma = CLASSES.index("no_tumor"), CLASSES.index("glioma")
    y = np.array([glioma, glioma, no, no, glioma, no])
    predicted = np.array([glioma, no, no, glioma, glioma, no])
    probs = np.eye(len(CLASSES))[predicted]
    binary = binary_metrics(y, probs)
    assert (binary["sensitivity"], binary["specificity"]) == (round(2 / 3, 4), round(2 / 3, 4))
    table = by_sequence(y, probs, ["t1", "t1", "t1", "t1", "flair", "unspecified"])
    assert set(table) == {"t1", "flair"}
    assert table["t1"]["sensitivity"] == 0.5 and table["t1"]["specificity"] == 0.5
    assert table["flair"]["sensitivity"] == 1.0 and table["flair"]["specificity"] is None


def test_default_model_is_ranked_by_its_worst_held_out_figure():
    strong_in_collection = {"evaluation": {
        "sartaj/test": {"accuracy": 0.99},
        "sartaj/official_test_novel": {"accuracy": 0.9},
        "lgg/test": {"accuracy": 0.6, "by_sequence": {
            "t1": {"sensitivity": 0.4, "specificity": 0.99},
            "flair": {"sensitivity": 0.99, "specificity": 0.99}}}}}
    even = {"evaluation": {
        "sartaj/test": {"accuracy": 0.94},
        "sartaj/official_test_novel": {"accuracy": 0.85},
        "lgg/test": {"accuracy": 0.9, "by_sequence": {
            "t1": {"sensitivity": 0.9, "specificity": 0.92},
            "flair": {"sensitivity": 0.95, "specificity": 0.9}}}}}
    legacy = {"evaluation": {"test": {"accuracy": 0.999, "macro_f1": 0.999}}}
    assert registry.held_out_score(strong_in_collection)[0] == 0.4
    assert registry.held_out_score(even)[0] == 0.85
    ranked = sorted([strong_in_collection, even, legacy], key=registry.held_out_score, reverse=True)
    assert ranked == [even, strong_in_collection, legacy]


def test_unseen_collection_is_scored_on_the_same_patients(two_collections, tmp_path):
    data = load_datasets(list(two_collections), 32, cache_dir=tmp_path / "cache")
    plan = split_dataset(data)
    # A version-1 manifest: one root, paths under it, no "collections".
    legacy = {"root": "sartaj", "seed": 42, "group_distance": 4,
              "splits": {name: [p.split("/", 1)[1] for p, a in zip(data.paths, plan.assignment)
                                if a == name and p.startswith("sartaj/")]
                         for name in ("train", "val", "test", "official_test")}}
    assert all(p.startswith("sartaj/") for paths in manifest_splits(legacy).values() for p in paths)
    sets = {s.name: s for s in eval_sets(data, legacy)}
    assert {"sartaj/test", "sartaj/official_test", "lgg/unseen", "lgg/test"} <= set(sets)
    lgg_test = {data.paths[i] for i in sets["lgg/test"].indices}
    assert lgg_test == {p for p, a in zip(data.paths, plan.assignment)
                        if a == "test" and p.startswith("lgg/")}
    assert "never trained on" in sets["lgg/test"].description
    full = {"root": "sartaj+lgg", "collections": ["sartaj", "lgg"], "seed": 42,
            "group_distance": 4,
            "splits": {name: [p for p, a in zip(data.paths, plan.assignment) if a == name]
                       for name in ("train", "val", "test", "official_test")}}
    trained = {s.name: s for s in eval_sets(data, json.loads(json.dumps(full)))}
    assert "lgg/unseen" not in trained
    assert {data.paths[i] for i in trained["lgg/test"].indices} == lgg_test


def test_a_mask_follows_the_head_crop():
    """The tumour mask is cut and resized exactly as the image, through a frame and padding."""
    image = np.zeros((180, 240), np.float32)
    cv2.ellipse(image, (120, 90), (70, 60), 0, 0, 360, 90, -1)
    cv2.circle(image, (150, 80), 12, 250, -1)  # the "tumour"
    mask = np.zeros_like(image, np.uint8)
    cv2.circle(mask, (150, 80), 12, 255, -1)
    framed = cv2.copyMakeBorder(image, 4, 4, 4, 4, cv2.BORDER_CONSTANT, value=255)
    framed_mask = cv2.copyMakeBorder(mask, 4, 4, 4, 4, cv2.BORDER_CONSTANT, value=0)
    model_input = preprocess(framed, 64)[..., 0]
    aligned = resize_mask(framed_mask > 0, framed, 64)
    assert aligned.any()
    assert model_input[aligned].mean() > 0.9  # the mask covers the bright blob
    assert model_input[~aligned].mean() < 0.5
