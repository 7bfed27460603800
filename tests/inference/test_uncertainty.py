"""The "uncertain" rule: low calibrated confidence, or features unlike the predicted class's."""

import numpy as np
import pytest

from brainmri.inference import UncertaintyRule
from brainmri.inference import fit_feature_space
from brainmri.training.trust import fit_uncertainty


def _clusters(rng, n=400, dims=16):
    means = np.zeros((3, dims))
    means[0, 0], means[1, 1], means[2, 2] = 6.0, 6.0, 6.0
    labels = rng.integers(0, 3, n)
    return means[labels] + rng.normal(0, 1, (n, dims)), labels, means


def _one_hot(labels, classes=4, confidence=0.97):
    probs = np.full((len(labels), classes), (1 - confidence) / (classes - 1))
    probs[np.arange(len(labels)), labels] = confidence
    return probs


def test_far_features_are_atypical_and_near_ones_are_not():
    rng = np.random.default_rng(0)
    features, labels, means = _clusters(rng)
    centre, projection, class_means = fit_feature_space(features, labels, 4, dimensions=8)
    rule = UncertaintyRule(0.5, 2.0, centre, projection, class_means)
    near = means[[0, 1, 2]] + rng.normal(0, 0.3, (3, 16))
    far = means[[0, 1, 2]] + 40.0
    probs = _one_hot(np.array([0, 1, 2]))
    assert not rule.atypical(probs, near).any()
    assert rule.atypical(probs, far).all()
    # The distance is to the *predicted* class: class 0's features answered as class 1 are far.
    assert rule.atypical(_one_hot(np.array([1])), near[:1]).all()


def test_a_class_never_trained_on_is_always_atypical():
    rng = np.random.default_rng(1)
    features, labels, _ = _clusters(rng)
    rule = UncertaintyRule(0.5, 2.0, *fit_feature_space(features, labels, 4, dimensions=8))
    assert rule.atypical(_one_hot(np.array([3])), features[:1]).all()


def test_low_confidence_is_uncertain_without_features():
    rule = UncertaintyRule(0.9)
    probs = np.array([[0.85, 0.05, 0.05, 0.05], [0.95, 0.02, 0.02, 0.01]])
    assert rule.flags(probs, None).tolist() == [True, False]


def test_metadata_round_trip_gives_the_same_flags():
    rng = np.random.default_rng(2)
    features, labels, _ = _clusters(rng)
    rule = UncertaintyRule(0.8, 1.5, *fit_feature_space(features, labels, 4, dimensions=8))
    again = UncertaintyRule.from_metadata(rule.to_metadata())
    probs = _one_hot(labels, confidence=0.9)
    noisy = features + rng.normal(0, 2.0, features.shape)
    np.testing.assert_array_equal(rule.flags(probs, noisy), again.flags(probs, noisy))
    assert rule.flags(probs, noisy).any() and not rule.flags(probs, noisy).all()


def test_fit_uncertainty_reaches_the_target_on_typical_validation_slices():
    rng = np.random.default_rng(3)
    train, train_labels, means = _clusters(rng, n=600)
    val, val_labels, _ = _clusters(rng, n=600)
    # Confidence tracks correctness: wrong answers come with lower probabilities.
    predicted = val_labels.copy()
    wrong = rng.random(len(val_labels)) < 0.2
    predicted[wrong] = (val_labels[wrong] + 1) % 3
    confidence = np.where(wrong, rng.uniform(0.4, 0.8, len(val_labels)),
                          rng.uniform(0.6, 1.0, len(val_labels)))
    probs = np.zeros((len(val_labels), 4))
    probs[np.arange(len(val_labels)), predicted] = confidence
    probs[np.arange(len(val_labels)), 3] = 1 - confidence
    rule, figures = fit_uncertainty(train, train_labels, probs, val, val_labels, 0.98, 4)
    assert figures["accuracy_confident"] >= 0.98
    assert 0.0 < figures["coverage"] < 1.0
    assert figures["atypical_rate"] == pytest.approx(0.05, abs=0.01)
    confident = ~rule.flags(probs, val)
    assert confident.mean() == pytest.approx(figures["coverage"], abs=1e-4)
