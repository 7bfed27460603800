"""The guard network: its input, its sampling, its synthetic negatives and how the guard uses it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from brainmri.imaging import load_scan
from brainmri.inference import guardnet
from brainmri.inference import ood
from brainmri.training import guard_training
from brainmri.training import ood_sets

from conftest import encode
from conftest import synthetic_slice


def test_shrink_is_a_block_average_that_keeps_the_dtype():
    rng = np.random.default_rng(0)
    floats = rng.random((3, 128, 128, 1)).astype(np.float32)
    small = guardnet.shrink(floats, 64)
    assert small.shape == (3, 64, 64, 1) and small.dtype == np.float32
    assert small[1, 10, 20, 0] == pytest.approx(floats[1, 20:22, 40:42, 0].mean(), abs=1e-6)
    grey = (floats * 255).astype(np.uint8)
    assert guardnet.shrink(grey, 64).dtype == np.uint8
    assert guardnet.shrink(small, 64) is small  # already the guard's side
    with pytest.raises(ValueError, match="multiple"):
        guardnet.shrink(rng.random((1, 100, 100, 1)), 64)


def test_each_epoch_draws_every_group_equally_whatever_its_size():
    rng = np.random.default_rng(1)
    positives = np.array(["big"] * 900 + ["small"] * 100)
    negatives = np.array(["ct"] * 500 + ["photo"] * 20 + ["xray"] * 80)
    pos, neg = guard_training.sample_epoch(rng, positives, negatives, 6000, 0.5)
    assert len(pos) == 3000 and len(neg) == 3000
    drawn = {g: (positives[pos] == g).mean() for g in ("big", "small")}
    assert drawn == pytest.approx({"big": 0.5, "small": 0.5}, abs=0.04)
    for category in ("ct", "photo", "xray"):
        assert (negatives[neg] == category).mean() == pytest.approx(1 / 3, abs=0.04)


def test_ct_like_copes_with_a_head_too_small_to_keep_tissue_inside_its_skull():
    """An end-of-volume slice with a sliver of tissue: the bone ring erodes it all away."""
    grey = np.zeros((128, 128), np.uint8)
    grey[60:66, 60:66] = 200
    for seed in range(5):
        fake = ood_sets.ct_like(grey, np.random.default_rng(seed))
        assert fake.shape == grey.shape and fake.dtype == np.uint8


def test_ct_like_keeps_the_outline_with_a_bright_skull_around_flat_tissue():
    grey = synthetic_slice(160, 3)
    fake = ood_sets.ct_like(grey, np.random.default_rng(0))
    assert fake.shape == grey.shape and fake.dtype == np.uint8
    head = grey > 20
    assert (fake[~head] == 0).mean() > 0.95  # the background stays black
    # The brightest pixels are the ring: none in the middle of the head.
    rows, cols = np.nonzero(fake > 0.8 * 255)
    centre = np.array(grey.shape) / 2
    radius = np.hypot(rows - centre[0], cols - centre[1])
    assert len(radius) and radius.min() > 0.3 * grey.shape[0] / 2
    inner = fake[int(centre[0]) - 10:int(centre[0]) + 10, int(centre[1]) - 10:int(centre[1]) + 10]
    assert 0.15 * 255 < inner.mean() < 0.75 * 255


def test_ct_bone_air_turns_the_slices_dark_regions_to_bone_or_air():
    import cv2

    grey = synthetic_slice(160, 3)
    cv2.circle(grey, (80, 80), 9, 3, -1)  # a signal void in the middle of the head
    head = grey > 20
    void = []
    for seed in range(8):
        fake = ood_sets.ct_bone_air(grey, np.random.default_rng(seed))
        assert fake.shape == grey.shape and fake.dtype == np.uint8
        assert (fake[~head] == 0).mean() > 0.95  # the background stays black
        void.append(int(fake[80, 80]))
    # The void became bone (brightest) or air (black), never tissue; both happen.
    assert all(v >= 0.8 * 255 or v <= 0.1 * 255 for v in void)
    assert max(void) >= 0.8 * 255 and min(void) <= 0.1 * 255
    tiny = np.zeros((128, 128), np.uint8)
    tiny[60:66, 60:66] = 200  # an end-of-volume sliver: no tissue inside the bone ring
    assert ood_sets.ct_bone_air(tiny, np.random.default_rng(0)).shape == tiny.shape
    assert (ood_sets.ct_bone_air(np.zeros((64, 64), np.uint8), np.random.default_rng(0)) == 0).all()


class _FixedNetwork:
    """Stand-in for GuardNet: a logit per input from its mean brightness (bright = brain)."""

    def __init__(self):
        self.calls = 0

    def logits(self, images):
        self.calls += 1
        return np.asarray(images, np.float32).reshape(len(images), -1).mean(axis=1) * 10 - 1

    def scores(self, images):
        return {"brain_likeness": self.logits(images)}


def test_the_guard_refuses_below_the_network_bound_and_runs_it_once_per_batch():
    inputs = [load_scan(encode(synthetic_slice(160, seed)), 64) for seed in range(6)]
    dark = np.zeros_like(inputs[0]) + 0.02
    network = _FixedNetwork()
    scores = network.logits(np.stack(inputs))
    bound = float(scores.min()) - 0.01
    guard = ood.OODGuard({"brain_likeness": (bound, None)}, np.zeros((0, 0)), np.zeros((0, 0)),
                         network=network)
    network.calls = 0
    verdicts = guard.assess_many([*inputs, dark], [None] * 7, None)
    assert network.calls == 1
    assert [v.refused for v in verdicts] == [False] * 6 + [True]
    assert verdicts[-1].reasons == ("brain_likeness",)
    message = str(ood.NotBrainMRI(verdicts[-1]))
    assert "does not recognise it as a brain MRI slice" in message


def test_the_network_link_survives_the_metadata_round_trip():
    guard = ood.OODGuard({"brain_likeness": (-1.5, None)}, np.zeros((4, 3)), np.eye(3),
                         {"network": {"file": "guard/brainmri_guard.h5", "sha256": "ab" * 32,
                                      "bound": -1.5}})
    meta = guard.to_metadata()
    assert meta["network"]["file"] == "guard/brainmri_guard.h5"
    again = ood.OODGuard.from_metadata(meta, network=_FixedNetwork())
    assert again.info["network"] == meta["network"]
    assert again.bounds["brain_likeness"] == (-1.5, None)
    assert isinstance(again.network, _FixedNetwork)


@pytest.mark.slow
def test_a_short_training_separates_heads_from_noise():
    """A few epochs on synthetic heads vs noise and gradients: the traced net tells them apart."""
    heads = np.stack([load_scan(encode(synthetic_slice(160, s)), 128) for s in range(48)])
    others = np.stack([load_scan(image.data, 128) for image in ood_sets.synthetic_images(8)])
    to_u8 = lambda a: guardnet.shrink((a * 255).astype(np.uint8))  # noqa: E731
    config = guard_training.GuardConfig(network="cnn", epochs=3, epoch_images=512, width=8)
    model = guard_training.train_guardnet(
        to_u8(heads), np.array(["synthetic"] * len(heads)), to_u8(others),
        np.array(["noise"] * len(others)), config)
    net = guardnet.GuardNet(model)
    new_heads = np.stack([load_scan(encode(synthetic_slice(160, s)), 128) for s in range(100, 110)])
    new_others = np.stack([load_scan(image.data, 128)
                           for image in ood_sets.synthetic_images(2, seed=7)])
    assert np.median(net.logits(new_heads)) > np.median(net.logits(new_others))
    # The one-class distance in its pooled features, fitted on the heads alone (no negatives).
    bound = guard_training.fit_distance(net, to_u8(heads), to_u8(new_heads), config)
    far = net.scores(new_others)["brain_distance"]
    assert np.median(net.scores(new_heads)["brain_distance"]) < np.median(far)
    assert bound > 0


@pytest.mark.slow
def test_the_onnx_copy_gives_the_same_logits_and_features(tmp_path):
    model = guardnet.build_guardnet(64, width=4)
    path = tmp_path / "guard.h5"
    model.save(path)
    guardnet.write_onnx(model, path.with_suffix(".onnx"))
    onnx = guardnet.GuardNet(onnx_path=path.with_suffix(".onnx"))
    keras_net = guardnet.GuardNet(model)
    images = np.random.default_rng(1).random((5, 128, 128, 1)).astype(np.float32)
    (a, fa), (b, fb) = onnx.measure(images), keras_net.measure(images)
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert fa.shape == (5, 32)
    np.testing.assert_allclose(fa, fb, atol=1e-4)


class _DistanceNetwork(_FixedNetwork):
    """Stand-in with a fitted distance: how far each input's mean brightness is from 0.4."""

    def scores(self, images):
        means = np.asarray(images, np.float32).reshape(len(images), -1).mean(axis=1)
        return {"brain_likeness": self.logits(images), "brain_distance": (means - 0.4) ** 2 * 100}


def test_the_guard_refuses_beyond_the_distance_bound_and_says_why():
    inputs = [load_scan(encode(synthetic_slice(160, seed)), 64) for seed in range(4)]
    network = _DistanceNetwork()
    distances = network.scores(np.stack(inputs))["brain_distance"]
    bright = np.clip(inputs[0] + 0.5, 0, 1)  # a logit the network likes, far from every slice
    guard = ood.OODGuard({"brain_likeness": (-100.0, None),
                          "brain_distance": (None, float(distances.max()) + 0.01)},
                         np.zeros((0, 0)), np.zeros((0, 0)), network=network)
    verdicts = guard.assess_many([*inputs, bright], [None] * 5, None)
    assert [v.refused for v in verdicts] == [False] * 4 + [True]
    assert verdicts[-1].reasons == ("brain_distance",)
    message = str(ood.NotBrainMRI(verdicts[-1]))
    assert "unlike every brain MRI slice the guard network learnt from" in message
    assert "the right way up" in message  # turned slices are refused too: say how to send one


def test_gaussian_distance_is_the_squared_mahalanobis_distance_per_dimension():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(500, 3)) * [1.0, 2.0, 0.5]
    mean, whitening = ood.fit_gaussian(rows, shrinkage=0.0)
    probe = rng.normal(size=(5, 3))
    precision = np.linalg.inv(np.cov(rows, rowvar=False))
    expected = np.einsum("ij,jk,ik->i", probe - rows.mean(0), precision, probe - rows.mean(0)) / 3
    np.testing.assert_allclose(ood.gaussian_distance(probe, mean, whitening), expected, rtol=1e-9)


def test_prototype_distance_is_the_squared_distance_to_the_nearest_prototype_per_dimension():
    rng = np.random.default_rng(0)
    prototypes = rng.normal(size=(7, 4))
    probe = np.r_[rng.normal(size=(5, 4)), prototypes[3:4]]
    expected = ((probe[:, None, :] - prototypes[None]) ** 2).sum(-1).min(1) / 4
    got = ood.prototype_distance(probe, prototypes)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    assert got[-1] == pytest.approx(0.0, abs=1e-12)  # a prototype itself is at distance 0


def test_cluster_means_follow_the_sorted_labels_whatever_they_are():
    rows = np.array([[1.0, 0.0], [3.0, 2.0], [5.0, 4.0], [0.0, 8.0]])
    means = ood.cluster_means(rows, np.array([7, 2, 7, 2]))
    np.testing.assert_allclose(means, [[1.5, 5.0], [3.0, 2.0]])  # label 2, then label 7


def test_prototypes_are_near_every_look_of_the_positives_where_one_gaussian_is_not():
    """Two tight clouds: a point between them is far from both centres, though the Gaussian
    fitted on both clouds puts it at their mean, as close as anything gets."""
    rng = np.random.default_rng(1)
    rows = np.r_[rng.normal(-5, 0.3, size=(200, 2)), rng.normal(5, 0.3, size=(200, 2))]
    clusters = ood.fit_prototypes(rows, 2, seed=0)
    assert len(set(clusters[:200].tolist())) == 1 and clusters[0] != clusters[-1]
    centres = np.stack([rows[clusters == k].mean(0) for k in (0, 1)])
    between, inside = np.zeros((1, 2)), np.full((1, 2), 5.0)
    far, near = ood.prototype_distance(np.r_[between, inside], centres)
    assert far > 50 * near
    mean, whitening = ood.fit_gaussian(rows, shrinkage=0.0)
    assert ood.gaussian_distance(between, mean, whitening)[0] < ood.gaussian_distance(
        inside, mean, whitening)[0]


def test_the_distance_fits_round_trip_through_the_guard_metadata():
    rng = np.random.default_rng(2)
    fits = [guardnet.PrototypeFit(rng.normal(size=(6, 5))),
            guardnet.GaussianFit(*ood.fit_gaussian(rng.normal(size=(50, 5)), 0.1))]
    probe = rng.normal(size=(4, 5))
    for fit in fits:
        meta = guardnet.embedding_to_metadata(fit, 1.5, fitted_on="test")
        assert meta["bound"] == 1.5 and meta["layer"] == guardnet.EMBEDDING_LAYER
        again = guardnet.embedding_from_metadata(meta)
        assert type(again) is type(fit)
        np.testing.assert_allclose(again.distance(probe), fit.distance(probe), rtol=1e-5)
    # A guard written before prototypes has no "kind": its fit is the Gaussian.
    old = guardnet.embedding_to_metadata(fits[1], 1.0)
    del old["kind"]
    assert isinstance(guardnet.embedding_from_metadata(old), guardnet.GaussianFit)
    with pytest.raises(ValueError, match="unknown"):
        guardnet.embedding_from_metadata({**old, "kind": "forest"})


def test_the_trunks_prototypes_are_its_clusters_means_in_each_heads_standardised_features():
    """Clusters found once serve every fold: a cluster's standardised mean is its mean
    standardised, whatever the fold's head standardises with."""
    from brainmri.training import guard_trunk

    rng = np.random.default_rng(3)
    positives = np.r_[rng.normal(0, 1, size=(60, 6)), rng.normal(8, 1, size=(60, 6))]
    negatives = rng.normal(-8, 1, size=(40, 6))
    clusters = guard_trunk.cluster_positives(positives, 2)
    for kept in (negatives, negatives[:10]):
        head = guard_trunk.fit_head(positives, np.zeros(120), kept, np.zeros(len(kept)), 1.0)
        fit = guard_trunk.prototypes_of(head, ood.cluster_means(positives, clusters))
        z = head.standardise(positives)
        want = np.stack([z[clusters == k].mean(0) for k in np.unique(clusters)])
        np.testing.assert_allclose(fit.prototypes, want, atol=1e-9)


def test_a_fold_counts_an_image_refused_by_either_check():
    report = {"categories": {}, "margins": {}, "distance_margins": {}}
    names = np.array(["ct/a.png", "ct/b.png", "ct/c.png", "ct/d.png"])
    guard_training.record_fold(report, "ct", names, np.array([-1.0, 2.0, 3.0, -0.5]),
                               np.array([1.0, -2.0, 3.0, -0.1]))
    assert report["categories"]["ct"] == {"images": 4, "refused": 3, "rate": 0.75}
    assert report["margins"]["ct/b.png"] == 2.0 and report["distance_margins"]["ct/b.png"] == -2.0


@pytest.mark.slow
def test_a_model_whose_guard_network_lost_its_distance_fit_refuses_to_serve(tmp_path):
    """The model's guard checks brain_distance: a network metadata without the fit must not
    silently drop that check."""
    import json
    import shutil

    from brainmri.config import DEFAULTS
    from brainmri.inference import ModelError
    from brainmri.inference import Predictor

    shipped = Path(DEFAULTS["BRAINMRI_MODEL_DIR"])
    for name in ("brainmri_cnn.h5", "brainmri_cnn.json"):
        shutil.copy(shipped / name, tmp_path / name)
    shutil.copytree(shipped / "guard", tmp_path / "guard")
    assert "brain_distance" in json.loads((tmp_path / "brainmri_cnn.json").read_text())["ood"]["bounds"]
    assert Predictor.from_path(tmp_path / "brainmri_cnn.h5").guard.network.embedding is not None
    meta_path = tmp_path / "guard" / "brainmri_guard.json"
    meta = json.loads(meta_path.read_text())
    del meta["embedding"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="brain_distance"):
        Predictor.from_path(tmp_path / "brainmri_cnn.h5").guard


def test_a_collection_fold_drops_the_negatives_made_from_that_collections_slices(monkeypatch):
    """Patches, inversions and CT look-alikes of a collection's slices would teach the fold
    that collection's look as "not brain": the fold that leaves it out must not see them."""
    made_from_slices = ood_sets.made_from_slices
    grey = np.zeros((1, 64, 64, 1), np.uint8)
    data = guard_training.GuardData(
        positives=np.repeat(grey, 4, 0), collections=np.array(["lgg", "lgg", "sartaj", "sartaj"]),
        val=np.repeat(grey, 2, 0), val_collections=np.array(["lgg", "sartaj"]),
        negatives=np.repeat(grey, 4, 0),
        categories=np.array(["head_ct", "exposure_patch", "exposure_ct_like", "exposure_noise"]),
        sources=np.array(["repo", made_from_slices("lgg"), made_from_slices("sartaj"),
                          "synthetic"]),
        names=np.array(["head_ct/a.png", "", "", ""]))
    seen = {}

    def accept_all(which, mask):
        return np.ones(int(mask.sum())), np.ones(int(mask.sum()))

    def fake(data, keep_neg, keep_pos, config, progress):
        left_out = sorted(set(data.collections[~keep_pos].tolist()))
        seen[tuple(left_out) or ("category fold",)] = data.sources[keep_neg].tolist()
        return guard_training.FittedGuard(0.0, 1.0, (np.zeros(1), np.eye(1)), accept_all,
                                          lambda: None)

    monkeypatch.setattr(guard_training, "_train_and_bound", fake)
    report = guard_training.held_out(data, guard_training.GuardConfig())
    assert made_from_slices("sartaj") not in seen[("sartaj",)]
    assert made_from_slices("lgg") in seen[("sartaj",)] and "repo" in seen[("sartaj",)]
    assert made_from_slices("lgg") not in seen[("lgg",)]
    assert set(report["collections"]) == {"lgg", "sartaj"}


def test_slices_an_audit_found_not_to_be_mri_are_no_guard_positives():
    paths = ["sartaj/Training/a.jpg", "sartaj/Training/ct.jpg", "lgg/p1/b.tif"]
    kept = guard_training.drop_listed(np.array([2, 1, 0]), paths, {"sartaj/Training/ct.jpg"})
    assert kept.tolist() == [2, 0]
    from brainmri.training.trust import listed_not_mri
    assert any(path.startswith("sartaj/Training/") for path in listed_not_mri())


@pytest.mark.slow
def test_the_trunk_guard_network_scores_exactly_as_its_head_in_feature_space(tmp_path):
    """The trunk recipe fits its head and bounds on cached features; the served network (Keras
    and its ONNX copy) must compute those very logits and standardised features."""
    from brainmri.training import guard_trunk

    trunk = guard_trunk.build_trunk(guardnet.GUARD_SIDE, weights=None)  # the graph, not ImageNet
    rng = np.random.default_rng(3)
    images = (rng.random((12, guardnet.GUARD_SIDE, guardnet.GUARD_SIDE, 1)) * 255).astype(np.uint8)
    features = guard_trunk.trunk_features(trunk, images)
    assert features.shape == (12, 464)
    head = guard_trunk.fit_head(features[:6], np.array(["a"] * 3 + ["b"] * 3), features[6:],
                                np.array(["noise"] * 6), c=1.0)
    model = guard_trunk.guard_model(trunk, head)
    path = tmp_path / "guard.h5"
    model.save(path)
    guardnet.write_onnx(model, path.with_suffix(".onnx"))
    import keras

    for net in (guardnet.GuardNet(keras.models.load_model(path, compile=False)),
                guardnet.GuardNet(onnx_path=path.with_suffix(".onnx"))):
        logits, embedded = net.measure(images)
        np.testing.assert_allclose(logits, head.logits(features), rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(embedded, head.standardise(features), rtol=1e-4, atol=1e-3)


def test_a_trunk_head_weighs_each_group_equally_whatever_its_size():
    from brainmri.training import guard_trunk

    weights = guard_trunk.group_weights(np.array(["big"] * 9 + ["small"]))
    assert weights.sum() == pytest.approx(1.0)
    assert weights[:9].sum() == pytest.approx(weights[9:].sum())


def test_the_logit_bound_widens_only_as_far_as_the_validation_refusal_budget_allows():
    logits = np.random.default_rng(0).normal(5.0, 1.0, 4000)
    config = guard_training.GuardConfig()
    bound = guard_training._logit_bound(logits, config)
    assert bound <= np.quantile(logits, config.tail)  # widened, never narrowed
    assert (logits < bound).mean() <= config.max_logit_refusal
    bare = guard_training._logit_bound(logits, guard_training.GuardConfig(margin=0.0))
    assert bare == pytest.approx(np.quantile(logits, config.tail), abs=0.05)


def _synthetic_guard_data(train: int, val: int, per_category: int) -> guard_training.GuardData:
    """Synthetic heads (train, then val) against `ood_sets.synthetic_images`, as GuardData."""
    heads = np.stack([load_scan(encode(synthetic_slice(160, s)), 128) for s in range(train + val)])
    others = np.stack([load_scan(image.data, 128)
                       for image in ood_sets.synthetic_images(per_category)])
    to_u8 = lambda a: guardnet.shrink((a * 255).astype(np.uint8))  # noqa: E731
    return guard_training.GuardData(
        positives=to_u8(heads[:train]), collections=np.array(["synthetic"] * train),
        val=to_u8(heads[train:]), val_collections=np.array(["synthetic"] * val),
        negatives=to_u8(others), categories=np.array(["noise"] * len(others)),
        sources=np.array(["synthetic"] * len(others)), names=np.array([""] * len(others)))


@pytest.mark.slow
def test_a_trunk_fit_refuses_noise_accepts_new_heads_and_serves(tmp_path):
    """The shipped recipe end to end on synthetic heads vs synthetic negatives: ImageNet trunk,
    fitted head, both bounds, the saved network loads with its distance fit and separates them."""
    data = _synthetic_guard_data(train=48, val=16, per_category=8)
    block = guard_training.fit(data, tmp_path / "guard.h5", guard_training.GuardConfig(head_c=1.0))
    assert block["network"].startswith("lite0-trunk")
    net = guardnet.GuardNet.load(tmp_path / "guard.h5", onnx_sha256=block["onnx_sha256"])
    assert net.embedding is not None
    new_heads = np.stack([load_scan(encode(synthetic_slice(160, s)), 128) for s in range(100, 110)])
    new_others = np.stack([load_scan(image.data, 128)
                           for image in ood_sets.synthetic_images(2, seed=7)])
    kept, gone = net.scores(new_heads), net.scores(new_others)
    assert np.median(kept["brain_likeness"]) > block["bound"] > np.median(gone["brain_likeness"])
    assert np.median(kept["brain_distance"]) < np.median(gone["brain_distance"])


def test_a_zoomed_in_positive_is_the_same_head_cut_by_the_frame():
    """Teaching files zoom in until the head fills the frame: such positives must show less
    background than the slice they came from, at the same side and range."""
    slice_ = load_scan(encode(synthetic_slice(160, 4)), 128)[..., 0]
    rng = np.random.default_rng(0)
    for _ in range(5):
        zoomed = guard_training.zoomed_in(slice_, rng)
        assert zoomed.shape == slice_.shape and 0.0 <= zoomed.min() and zoomed.max() <= 1.0
        assert (zoomed < 0.05).mean() < (slice_ < 0.05).mean()


def test_a_source_fold_leaves_out_that_source_alone_and_keeps_the_categorys_others(monkeypatch):
    """A new source of a known kind is the likeliest real case: its fold must still train on
    the category's other sources, and record every held-out image's margins."""
    grey = np.zeros((1, 64, 64, 1), np.uint8)
    data = guard_training.GuardData(
        positives=np.repeat(grey, 2, 0), collections=np.array(["lgg", "sartaj"]),
        val=np.repeat(grey, 2, 0), val_collections=np.array(["lgg", "sartaj"]),
        negatives=np.repeat(grey, 4, 0),
        categories=np.array(["head_ct", "head_ct", "head_ct", "chest_xray"]),
        sources=np.array(["repo_a", "repo_b", "repo_b", "repo_c"]),
        names=np.array(["head_ct/a.png", "head_ct/b1.png", "head_ct/b2.png", "chest_xray/c.png"]))
    trained_on = []

    def fake(data, keep_neg, keep_pos, config, progress):
        trained_on.append(data.names[keep_neg].tolist())

        def margins(which, mask):  # refuse b1 only, whoever left it out
            if which != "negatives":
                return np.ones(int(mask.sum())), np.ones(int(mask.sum()))
            logit = np.array([-1.0 if n == "head_ct/b1.png" else 1.0 for n in data.names[mask]])
            return logit, np.ones(len(logit))
        return guard_training.FittedGuard(0.0, 1.0, (np.zeros(1), np.eye(1)), margins,
                                          lambda: None)

    monkeypatch.setattr(guard_training, "_train_and_bound", fake)
    report = guard_training.held_out(data, guard_training.GuardConfig(), ["head_ct"])
    assert ["head_ct/b1.png", "head_ct/b2.png", "chest_xray/c.png"] in trained_on  # a out
    assert ["head_ct/a.png", "chest_xray/c.png"] in trained_on  # b out, a kept
    assert report["sources"]["head_ct"] == {"repo_a": {"images": 1, "refused": 0, "rate": 0.0},
                                            "repo_b": {"images": 2, "refused": 1, "rate": 0.5}}
    assert report["source_margins"]["head_ct/b1.png"] == -1.0
    no_sources = guard_training.held_out(
        data, guard_training.GuardConfig(source_folds=False), ["head_ct"])
    assert "sources" not in no_sources


@pytest.mark.slow
def test_the_cnn_recipe_still_fits_bounds_and_serves(tmp_path):
    """`train-guard --network cnn` goes through the same fit and files as the trunk."""
    heads = np.stack([load_scan(encode(synthetic_slice(160, s)), 128) for s in range(2)])
    data = _synthetic_guard_data(train=16, val=8, per_category=4)
    config = guard_training.GuardConfig.cnn(epochs=1, epoch_images=64, width=4)
    block = guard_training.fit(data, tmp_path / "guard.h5", config)
    assert block["network"] == "small CNN trained from scratch" and block["bound_margin"] == 0.0
    net = guardnet.GuardNet.load(tmp_path / "guard.h5", onnx_sha256=block["onnx_sha256"])
    assert isinstance(net.embedding, guardnet.GaussianFit) and net.engine == "onnx"
    assert set(net.scores(heads[:2])) == {"brain_likeness", "brain_distance"}
