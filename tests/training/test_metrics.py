"""The evaluation figures (scikit-learn underneath): ROC points and AUC, per-class figures, counts."""

from __future__ import annotations

import numpy as np
import pytest

from brainmri.inference import CLASSES
from brainmri.training.metrics import binary_metrics
from brainmri.training.metrics import classification_metrics
from brainmri.training.metrics import confusion_counts
from brainmri.training.metrics import expected_calibration_error
from brainmri.training.metrics import roc_curve


def test_roc_curve_has_one_point_per_distinct_score_and_the_trapezoid_auc():
    positive = np.array([1, 0, 1, 1, 0, 0, 1], bool)
    scores = np.array([0.9, 0.8, 0.8, 0.4, 0.3, 0.3, 0.1])
    fpr, tpr, auc = roc_curve(positive, scores)
    # Tied scores (0.8, 0.3) are one step each, never a staircase.
    np.testing.assert_allclose(fpr, [0, 0, 1 / 3, 1 / 3, 1, 1])
    np.testing.assert_allclose(tpr, [0, 0.25, 0.5, 0.75, 0.75, 1])
    assert auc == pytest.approx(np.trapezoid(tpr, fpr))
    assert auc == pytest.approx(0.625)


@pytest.mark.parametrize("positive", [np.ones(5, bool), np.zeros(5, bool)])
def test_roc_curve_of_one_class_has_no_auc(positive):
    _, _, auc = roc_curve(positive, np.linspace(0, 1, 5))
    assert np.isnan(auc)


def test_classification_metrics_count_and_leave_absent_classes_undefined():
    # True: glioma ×3, meningioma ×2, no_tumor ×1; pituitary absent. Predicted by argmax.
    y = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, 3, 2])
    probs = np.eye(4)[predicted] * 0.7 + 0.075
    m = classification_metrics(y, probs)
    assert m["confusion_matrix"]["rows_true_cols_predicted"] == [
        [2, 1, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]]
    glioma, meningioma, pituitary = (m["per_class"][c] for c in ("glioma", "meningioma", "pituitary"))
    assert (glioma["precision"], glioma["recall"], glioma["f1"]) == (1.0, 0.6667, 0.8)
    assert (meningioma["precision"], meningioma["recall"]) == (0.5, 0.5)
    # Never true and predicted once: precision 0, recall undefined, no AUC, and not in macro-F1.
    assert pituitary == {"precision": 0.0, "recall": None, "f1": 0.0, "support": 0, "auc": None}
    assert m["macro_f1"] == round(np.mean([0.8, 0.5, 1.0]), 4)
    assert m["accuracy"] == round(4 / 6, 4)


def test_binary_metrics_count_tumours_against_no_tumour():
    no_tumor = CLASSES.index("no_tumor")
    y = np.array([0, 1, 3, no_tumor, no_tumor, no_tumor])
    predicted = np.array([0, no_tumor, 3, no_tumor, 1, no_tumor])
    assert binary_metrics(y, np.eye(4)[predicted]) == {
        "tumor_images": 3, "no_tumor_images": 3, "sensitivity": 0.6667, "specificity": 0.6667}


def test_an_empty_set_counts_nothing_instead_of_failing():
    assert not confusion_counts(np.zeros(0, int), np.zeros(0, int), np.arange(4)).any()
    empty = classification_metrics(np.zeros(0, int), np.zeros((0, 4)))
    assert empty["images"] == 0 and empty["accuracy"] is None and empty["macro_f1"] is None
    assert binary_metrics(np.zeros(0, int), np.zeros((0, 4)))["sensitivity"] is None


def test_expected_calibration_error_is_the_weighted_gap():
    confidence = np.array([0.95, 0.95, 0.55, 0.55])
    correct = np.array([True, True, True, False])
    # Bin of 0.95: accuracy 1 (gap 0.05); bin of 0.55: accuracy 0.5 (gap 0.05); half each.
    assert expected_calibration_error(correct, confidence) == pytest.approx(0.05)
