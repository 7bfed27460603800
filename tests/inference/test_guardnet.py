"""The guard network: its input, its sampling, its synthetic negatives and how the guard uses it."""

from __future__ import annotations

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


class _FixedNetwork:
    """Stand-in for GuardNet: a logit per input from its mean brightness (bright = brain)."""

    def __init__(self):
        self.calls = 0

    def logits(self, images):
        self.calls += 1
        return np.asarray(images, np.float32).reshape(len(images), -1).mean(axis=1) * 10 - 1


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
    config = guard_training.GuardConfig(epochs=3, epoch_images=512, width=8)
    model = guard_training.train_guardnet(
        to_u8(heads), np.array(["synthetic"] * len(heads)), to_u8(others),
        np.array(["noise"] * len(others)), config)
    net = guardnet.GuardNet(model)
    new_heads = np.stack([load_scan(encode(synthetic_slice(160, s)), 128) for s in range(100, 110)])
    new_others = np.stack([load_scan(image.data, 128)
                           for image in ood_sets.synthetic_images(2, seed=7)])
    assert np.median(net.logits(new_heads)) > np.median(net.logits(new_others))
