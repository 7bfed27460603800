"""The "uncertain" rule: a confident answer needs a high calibrated probability *and* an input
whose features look like the training slices of the class it was given.

Temperature scaling and a probability threshold are fitted on the validation split, which
shares collections and sequences with training; on a sequence or collection the network never
saw, it can be confidently wrong (a T2 meningioma called "no tumor" at 95 %). The second
condition catches such inputs: the distance of the network's pooled last-conv features to the
training features of the predicted class (class-conditional Gaussians with one shared
covariance, Lee et al., NeurIPS 2018), bounded at a quantile of the validation distances.
NumPy only; fitted by `brainmri calibrate`, stored in the model metadata ("uncertainty").
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["UncertaintyRule", "fit_feature_space"]

# Principal directions of the within-class covariance kept: enough for the CNN's 128 and
# Lite0's 1,280 features, small enough to store in the metadata (float32, base64).
MAX_DIMENSIONS = 64


def fit_feature_space(features: np.ndarray, labels: np.ndarray, classes: int,
                      dimensions: int = MAX_DIMENSIONS, shrinkage: float = 0.01
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centre, projection, class_means) of a shared-covariance Gaussian per class.

    `projection` (features, d) whitens the within-class covariance along its top `d` principal
    directions, so ||(f - centre) @ projection - class_means[k]||² / d is the squared
    Mahalanobis distance to class k, per dimension. A class with no row gets NaN means.
    """
    features = np.asarray(features, np.float64)
    centre = features.mean(axis=0)
    centred = features - centre
    means = np.full((classes, features.shape[1]), np.nan)
    within = np.zeros_like(centred)
    for k in range(classes):
        rows = labels == k
        if rows.any():
            means[k] = centred[rows].mean(axis=0)
            within[rows] = centred[rows] - means[k]
    cov = np.atleast_2d(np.cov(within, rowvar=False))
    average = np.trace(cov) / len(cov) or 1.0
    cov = (1 - shrinkage) * cov + shrinkage * average * np.eye(len(cov))
    values, vectors = np.linalg.eigh(cov)
    keep = np.argsort(values)[::-1][: min(dimensions, len(values))]
    projection = vectors[:, keep] / np.sqrt(values[keep])
    return centre, projection, means @ projection


@dataclass(frozen=True)
class UncertaintyRule:
    """When an answer is flagged "uncertain": low calibrated confidence, or atypical features."""

    confidence_below: float
    distance_above: float | None = None
    centre: np.ndarray | None = None  # (features,)
    projection: np.ndarray | None = None  # (features, d)
    class_means: np.ndarray | None = None  # (classes, d), model output order

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance (per dimension) of each row to every class: (N, classes)."""
        z = (np.atleast_2d(np.asarray(features, np.float64)) - self.centre) @ self.projection
        diff = z[:, None, :] - self.class_means[None]
        return (diff**2).mean(axis=2)

    def atypical(self, probs: np.ndarray, features: np.ndarray | None) -> np.ndarray:
        """True where the features lie far from the training slices of the predicted class."""
        probs = np.atleast_2d(probs)
        if self.distance_above is None or features is None or self.projection is None:
            return np.zeros(len(probs), bool)
        distance = self.distances(features)[np.arange(len(probs)), probs.argmax(1)]
        return ~(distance <= self.distance_above)  # NaN (a class never trained on) counts

    def flags(self, probs: np.ndarray, features: np.ndarray | None) -> np.ndarray:
        """The "uncertain" flag of each calibrated row (N, classes), given its features."""
        probs = np.atleast_2d(probs)
        return (probs.max(1) < self.confidence_below) | self.atypical(probs, features)

    def to_metadata(self) -> dict[str, Any]:
        """JSON form for the model metadata."""
        block: dict[str, Any] = {"confidence_below": round(float(self.confidence_below), 6)}
        if self.distance_above is not None:
            block |= {
                "distance_above": round(float(self.distance_above), 6),
                "centre": np.round(self.centre, 6).tolist(),
                "class_means": np.round(self.class_means, 6).tolist(),
                "projection_shape": list(self.projection.shape),
                "projection_float32_base64": base64.b64encode(
                    self.projection.astype("<f4").tobytes()).decode("ascii"),
            }
        return block

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> UncertaintyRule:
        """Read `to_metadata`'s form back."""
        if meta.get("distance_above") is None:
            return cls(float(meta["confidence_below"]))
        shape = tuple(meta["projection_shape"])
        projection = np.frombuffer(base64.b64decode(meta["projection_float32_base64"]), "<f4")
        return cls(float(meta["confidence_below"]), float(meta["distance_above"]),
                   np.asarray(meta["centre"], np.float64),
                   projection.reshape(shape).astype(np.float64),
                   np.asarray(meta["class_means"], np.float64))
