"""The report plots are written without matplotlib warnings, even from thin data."""

from __future__ import annotations

import warnings

import numpy as np

from brainmri.training import plots


def test_plots_of_a_one_class_set_and_a_loss_only_history_warn_about_nothing(tmp_path):
    """No ROC curve to name (one class) and no accuracy curve (a history with losses only):
    legend() on an empty axis would warn "No artists with labels found to put in legend"."""
    y = np.zeros(6, int)
    probs = np.tile([0.7, 0.1, 0.1, 0.1], (6, 1))
    history = {"loss": [1.2, 0.8, 0.6], "val_loss": [1.3, 0.9, 0.7]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        written = plots.write_all(tmp_path, {"only_glioma": (y, probs)}, history)
    assert written == ["confusion_only_glioma.png", "roc_only_glioma.png",
                       "confidence_only_glioma.png", "reliability_only_glioma.png",
                       "training_curves.png"]
    assert all((tmp_path / name).stat().st_size > 0 for name in written)
