"""Near-duplicate grouping and the group-disjoint split (no TensorFlow)."""

import cv2
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from brainmri.training import dedup
from brainmri.training.dataset import discover
from brainmri.training.dataset import normalise_class_name
from brainmri.training.splits import OFFICIAL_TEST
from brainmri.training.splits import split_by_group


def _scan(seed: int, size: int = 256) -> np.ndarray:
    """A synthetic 'head': a bright ellipse with random internal structure."""
    rng = np.random.default_rng(seed)
    image = np.zeros((size, size), np.float32)
    cv2.ellipse(image, (size // 2, size // 2), (size // 3, size // 2 - 20), 0, 0, 360, 120, -1)
    for _ in range(6):
        centre = tuple(int(v) for v in rng.integers(size // 4, 3 * size // 4, 2))
        cv2.circle(image, centre, int(rng.integers(8, 30)), float(rng.integers(150, 255)), -1)
    return cv2.GaussianBlur(image, (7, 7), 0)


def _flip_bits(value: int, bits: list[int]) -> int:
    for bit in bits:
        value ^= 1 << bit
    return value


def test_hash_survives_reencoding_and_resizing():
    image = _scan(1)
    ok, jpeg = cv2.imencode(".jpg", image.astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 70])
    assert ok
    reencoded = cv2.imdecode(jpeg, cv2.IMREAD_GRAYSCALE).astype(np.float32)
    smaller = cv2.resize(image, (180, 180), interpolation=cv2.INTER_AREA)
    base = dedup.perceptual_hash(image)
    for copy in (reencoded, smaller, image * 0.8 + 10):
        assert bin(base ^ dedup.perceptual_hash(copy)).count("1") <= dedup.DEFAULT_MAX_DISTANCE


def test_hash_separates_different_scans():
    hashes = [dedup.perceptual_hash(_scan(seed)) for seed in range(10)]
    distances = [bin(a ^ b).count("1") for i, a in enumerate(hashes) for b in hashes[i + 1 :]]
    assert min(distances) > dedup.DEFAULT_MAX_DISTANCE


def test_grouping_joins_planted_duplicates_transitively():
    base = 0x0123456789ABCDEF
    far = 0xFEDCBA9876543210
    hashes = np.array([base, _flip_bits(base, [1, 2]), _flip_bits(base, [1, 2, 3, 4, 5, 6]), far,
                       _flip_bits(far, [60])], dtype=np.uint64)
    groups = dedup.group_near_duplicates(hashes, max_distance=4)
    # 0~1 (2 bits), 1~2 (4 bits) chain into one group though 0 and 2 differ by 6 bits.
    assert groups[0] == groups[1] == groups[2]
    assert groups[3] == groups[4]
    assert groups[0] != groups[3]


def test_duplicate_groups_flag_conflicting_labels():
    groups = np.array([0, 0, 1, 1, 2])
    found = dedup.duplicate_groups(groups, ["glioma", "glioma", "glioma", "no_tumor", "pituitary"])
    assert [g.members for g in found] == [(0, 1), (2, 3)]
    assert [g.conflicting for g in found] == [False, True]


@pytest.mark.parametrize(("folder", "expected"), [
    ("glioma_tumor", "glioma"), ("Glioma", "glioma"), ("meningioma_tumor", "meningioma"),
    ("notumor", "no_tumor"), ("no_tumor", "no_tumor"), ("No Tumor", "no_tumor"),
    ("pituitary_tumor", "pituitary"), ("Pituitary", "pituitary"), ("cats", None),
])
def test_class_folder_names_are_normalised(folder, expected):
    assert normalise_class_name(folder) == expected


def test_discover_reads_training_and_testing_layout(tmp_path):
    for split, cls in (("Training", "glioma_tumor"), ("Testing", "No Tumor"), ("Training", "notes")):
        (tmp_path / split / cls).mkdir(parents=True)
        (tmp_path / split / cls / "a (1).jpg").write_bytes(b"x")
    samples = discover(tmp_path)
    assert {(s.label, s.source) for s in samples} == {("glioma", "train"), ("no_tumor", "test")}


def test_discover_explains_an_unrecognised_folder(tmp_path):
    (tmp_path / "cats").mkdir()
    with pytest.raises(ValueError, match="class folders"):
        discover(tmp_path)


@st.composite
def _planted_data(draw):
    """Random groups (some with planted duplicates, some spanning the official test folder)."""
    n_groups = draw(st.integers(8, 60))
    groups, labels, sources = [], [], []
    for g in range(n_groups):
        size = draw(st.integers(1, 6))
        label = draw(st.sampled_from(["glioma", "meningioma", "no_tumor", "pituitary"]))
        for _ in range(size):
            groups.append(g)
            # Occasionally a duplicate carries another label, as in the real data.
            labels.append(draw(st.sampled_from([label] * 5 + ["glioma"])))
            sources.append(draw(st.sampled_from(["train"] * 6 + ["test"])))
    seed = draw(st.integers(0, 2**16))
    return np.array(groups), labels, sources, seed


@settings(max_examples=200, deadline=None)
@given(_planted_data(), st.booleans())
def test_no_group_straddles_splits(data, exclude):
    groups, labels, sources, seed = data
    plan = split_by_group(groups, labels, sources, seed=seed, exclude_official_test_duplicates=exclude)
    assignment = plan.assignment
    for group in np.unique(groups):
        members = assignment[(groups == group) & (np.array(sources) == "train")]
        # Every Training-folder member of a group sits in exactly one split.
        assert len(set(members.tolist())) <= 1
    # The official Testing folder never reaches train, val or test.
    official = np.array(sources) == "test"
    assert set(assignment[official].tolist()) <= {OFFICIAL_TEST}
    tainted = set(groups[official].tolist())
    if exclude:
        trained = set(groups[np.isin(assignment, ["train", "val"])].tolist())
        assert not tainted & trained
    else:
        # Copies of official Testing images train; they never sit in val or the leak-free test.
        held_out = set(groups[np.isin(assignment, ["val", "test"])].tolist())
        assert not tainted & held_out


def test_split_is_reproducible_and_near_target_fractions():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(400), rng.integers(1, 4, 400))
    labels = [["glioma", "meningioma", "no_tumor", "pituitary"][g % 4] for g in groups]
    sources = ["train"] * len(groups)
    first = split_by_group(groups, labels, sources, seed=7)
    second = split_by_group(groups, labels, sources, seed=7)
    assert (first.assignment == second.assignment).all()
    fractions = {s: (first.assignment == s).mean() for s in ("train", "val", "test")}
    assert abs(fractions["test"] - 0.15) < 0.03
    assert abs(fractions["val"] - 0.15) < 0.03
    other = split_by_group(groups, labels, sources, seed=8)
    assert (first.assignment != other.assignment).any()
