"""Is this a brain MRI slice at all? Cheap image checks plus a distance in the model's features.

A classifier answers for any input, so a photo of a cat would get "glioma, 97 %". The guard
measures a few properties of the upload and of the preprocessed input (colour, a dark
background around a head-shaped region, texture) and how far the network's pooled last-conv
features lie from every class's training images (a Mahalanobis distance with a shared, slightly
shrunk covariance, as in Lee et al. 2018; an energy score
is not available because the model stores softmax outputs, whose log-sum-exp is always 0).
A third score comes from outlier exposure (Hendrycks et al. 2019): a logistic regression
(scikit-learn) on the pooled features, the cheap measurements and a small appearance descriptor
(intensity histogram, 8×8 thumbnail, edge-strength histogram), trained by `brainmri calibrate`
to tell training-split MRIs of every collection from real images that are not brain MRI
(`ood_train/`: CT, X-ray, other MRI, ultrasound, photos, ...) and from altered copies of the
training slices (small patches, inverted contrast; `ood_sets.exposure_negatives`). The CT and
non-brain MRI that the other checks let through resemble brain tissue in the network's
features; the descriptor sees the bright CT skull, the missing skull ring of a knee, and so on.

Every bound is fitted on the validation split by `brainmri calibrate` and stored in the model
metadata under "ood", except one physical rule (`FIXED_BOUNDS`): an 8-bit file that is almost
black shows no anatomy. No TensorFlow, no Flask.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from typing import Any

import cv2
import numpy as np

from ..imaging import ImageError

__all__ = [
    "EXPOSURE_INPUTS",
    "FEATURES",
    "FIXED_BOUNDS",
    "PEAK_FLOOR",
    "Exposure",
    "NotBrainMRI",
    "OODGuard",
    "Verdict",
    "choose_margin",
    "cluster_means",
    "descriptor",
    "fit_exposure",
    "fit_gaussian",
    "fit_guard",
    "fit_prototypes",
    "gaussian_distance",
    "gaussian_from_metadata",
    "gaussian_to_metadata",
    "image_features",
    "prototype_distance",
]

# Feature -> (which side is checked, the least slack beyond the validation data, what a refusal
# on it means to a user). The slack is a tolerance, not a threshold: grey JPEGs carry a little
# chroma noise (about 1 % of the range), which the validation files may happen not to show.
FEATURES: dict[str, tuple[str, float, str]] = {
    "colourfulness": ("high", 0.02, "it is in colour, and MRI slices are grey-scale"),
    "border_brightness": ("high", 0.0, "the background around the head is not dark"),
    "dark_fraction": ("both", 0.0, "its brightness histogram is unlike an MRI slice"),
    "head_fraction": ("both", 0.0, "no head-shaped region stands out from a dark background"),
    "texture": ("both", 0.0, "its texture is unlike an MRI slice (noise, text, patterns or blank)"),
    "feature_distance": ("high", 0.0,
                         "the network's features are far from every brain MRI it was trained on"),
    "appearance_distance": ("high", 0.0,
                            "its intensities, layout and shape are unlike every brain MRI slice "
                            "it was fitted on"),
    "mri_likeness": ("low", 0.0,
                     "it looks like a fragment or an altered copy of a scan rather than a whole "
                     "MRI slice"),
    "brain_likeness": ("low", 0.0,
                       "a network trained to tell brain MRI slices from CT, X-ray, MRI of other "
                       "body parts, ultrasound and photographs does not recognise it as a brain "
                       "MRI slice"),
    "brain_distance": ("high", 0.0,
                       "it is unlike every brain MRI slice the guard network learnt from, even "
                       "though it resembles none of the images it was taught to refuse"),
    "peak_brightness": ("low", 0.0,
                        "it is almost black: its brightest pixels stay under 5 % of full "
                        "brightness, so no anatomy is in view"),
}

# Bounds that are rules rather than fits. `peak_brightness` (`imaging.peak_brightness`, 8-bit
# files only): LGG's first and last slices, exported at a few grey levels of 255, are noise
# that preprocessing stretches into a full-range frame; a fitted bound would sit below them,
# since validation holds such slices too. 5 % (13 of 255) was read off LGG's training split by
# eye (302 of its 7,648 images lie under it): of 10 under 10 of 255 none showed anatomy, of 40
# from 8 to 13 three showed a faint head outline and the rest noise, ghosts or a blur; from 13
# to 30 more and more show a head, so the floor stays below them. No SARTAJ file comes near
# it (lowest 80 of 255).
PEAK_FLOOR = 0.05
FIXED_BOUNDS: dict[str, tuple[float | None, float | None]] = {"peak_brightness": (PEAK_FLOOR, None)}

# Cheap measurements the exposure head sees beside the pooled features (colour is left out:
# DICOM and grey files have none, and colour photos are refused on it already).
EXPOSURE_INPUTS = ("border_brightness", "dark_fraction", "head_fraction", "texture")


class NotBrainMRI(ImageError):
    """The upload decoded fine but does not look like a brain MRI slice; no class is given."""

    def __init__(self, verdict: Verdict) -> None:
        names = verdict.reasons
        if "peak_brightness" in names:  # an almost-black file fails the rest because of it
            names = ("peak_brightness",)
        reasons = "; ".join(FEATURES[name][2] for name in names) or "it is out of range"
        super().__init__(
            "not_brain_mri",
            f"This does not look like a brain MRI slice ({reasons}), so no class is given. "
            # Turned slices are refused a quarter of the time or more (docs/trust.md).
            "Upload a grey-scale MRI slice of the head, the right way up.",
        )
        self.verdict = verdict


@dataclass(frozen=True)
class Verdict:
    """The guard's decision for one input, with the measured scores."""

    refused: bool
    reasons: tuple[str, ...]
    scores: dict[str, float]


def image_features(model_input: np.ndarray, colourfulness: float | None = None,
                   peak_brightness: float | None = None) -> dict[str, float]:
    """Cheap measurements of one preprocessed input (size, size, 1) in [0, 1], with the colour
    and peak brightness of its file (`imaging.read_scan` measures both on the one decode; None:
    grey, and no full scale: "peak_brightness" is then left out, so never checked)."""
    x = np.asarray(model_input, np.float32).reshape(model_input.shape[0], model_input.shape[1])
    side = x.shape[0]
    ring = max(1, side // 12)
    border = np.concatenate([x[:ring].ravel(), x[-ring:].ravel(), x[:, :ring].ravel(), x[:, -ring:].ravel()])
    thumb = cv2.GaussianBlur((x * 255).astype(np.uint8), (5, 5), 0)
    otsu, _ = cv2.threshold(thumb, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    _, mask = cv2.threshold(thumb, max(otsu / 2, 8), 255, cv2.THRESH_BINARY)
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    head = stats[1:, cv2.CC_STAT_AREA].max() / x.size if count > 1 else 0.0
    # Mean absolute Laplacian: noise, text and checkerboards are far busier than MRI tissue;
    # a blank image has none at all.
    texture = float(np.abs(cv2.Laplacian(x, cv2.CV_32F, ksize=3)).mean())
    features = {
        "colourfulness": float(colourfulness or 0.0),
        "border_brightness": float(border.mean()),
        "dark_fraction": float((x < 0.1).mean()),
        "head_fraction": float(head),
        "texture": texture,
    }
    if peak_brightness is not None:
        features["peak_brightness"] = float(peak_brightness)
    return features


DESCRIPTOR_BINS = 16
DESCRIPTOR_THUMB = 8


def _head_shape(x: np.ndarray) -> np.ndarray:
    """Solidity, holes, outer-band contrast, big components, bright fraction, head std and mean."""
    u8 = cv2.GaussianBlur((x * 255).astype(np.uint8), (5, 5), 0)
    otsu, _ = cv2.threshold(u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    _, mask = cv2.threshold(u8, max(otsu / 2, 8), 255, cv2.THRESH_BINARY)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 1:
        return np.zeros(7)
    areas = stats[1:, cv2.CC_STAT_AREA]
    head = (labels == 1 + int(np.argmax(areas))).astype(np.uint8)
    contours, _ = cv2.findContours(head, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    contour = max(contours, key=cv2.contourArea)
    hull = cv2.contourArea(cv2.convexHull(contour)) or 1.0
    filled = np.zeros_like(head)
    cv2.drawContours(filled, [contour], -1, 1, -1)
    inside = filled.astype(bool)
    inner = cv2.erode(filled, np.ones((9, 9), np.uint8)).astype(bool)
    band = inside & ~inner
    # A CT skull is the brightest ring around flat tissue; an MRI scalp is not brighter than
    # everything inside it.
    contrast = (x[band].mean() if band.any() else 0.0) - (x[inner].mean() if inner.any() else 0.0)
    return np.array([
        cv2.contourArea(contour) / hull,  # a head is convex; a knee, a spine, a torso less so
        (inside.sum() - head.sum()) / max(inside.sum(), 1),  # dark holes: lungs, bowel gas
        contrast,
        float((areas > 0.01 * x.size).sum()),
        float((x > 0.9).mean()),
        float(x[inside].std()) if inside.any() else 0.0,
        float(x[inside].mean()) if inside.any() else 0.0,
    ])


def descriptor(model_input: np.ndarray) -> np.ndarray:
    """Appearance of one preprocessed input: histograms, an 8×8 thumbnail and the head's shape.

    About 0.3 ms. The intensity histogram separates CT (a bright skull around flat grey
    tissue) and radiographs from MRI, the thumbnail the layout (a round head against a dark
    background versus a knee, a spine or a torso), the edge histogram speckle and text, and the
    shape measurements (`_head_shape`) convexity, holes and a bright outer band.
    """
    x = np.asarray(model_input, np.float32).reshape(model_input.shape[0], model_input.shape[1])
    hist = np.histogram(x, bins=DESCRIPTOR_BINS, range=(0.0, 1.0))[0] / x.size
    thumb = cv2.resize(x, (DESCRIPTOR_THUMB, DESCRIPTOR_THUMB), interpolation=cv2.INTER_AREA)
    gx = cv2.Sobel(x, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(x, cv2.CV_32F, 0, 1, ksize=3)
    edges = np.histogram(np.hypot(gx, gy), bins=8, range=(0.0, 2.0))[0] / x.size
    return np.concatenate([hist, thumb.ravel(), edges, _head_shape(x)]).astype(np.float64)


@dataclass(frozen=True)
class Exposure:
    """A linear score, high for whole MRI slices, on log(1 + pooled features), cheap
    measurements and (from version 2) the appearance `descriptor`."""

    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    bias: float
    uses_descriptor: bool = False

    @staticmethod
    def inputs(embeddings: np.ndarray, features: Mapping[str, np.ndarray],
               descriptors: np.ndarray | None = None) -> np.ndarray:
        """The head's input rows: log1p of the (ReLU) pooled features, EXPOSURE_INPUTS, descriptors."""
        emb = np.log1p(np.maximum(np.atleast_2d(np.asarray(embeddings, np.float64)), 0.0))
        cheap = np.stack([np.atleast_1d(np.asarray(features[name], np.float64))
                          for name in EXPOSURE_INPUTS], axis=1)
        parts = [emb, cheap]
        if descriptors is not None:
            parts.append(np.atleast_2d(np.asarray(descriptors, np.float64)))
        return np.concatenate(parts, axis=1)

    def score(self, embeddings: np.ndarray, features: Mapping[str, np.ndarray],
              descriptors: np.ndarray | None = None) -> np.ndarray:
        """The logit of "whole MRI slice" per row."""
        rows = self.inputs(embeddings, features, descriptors if self.uses_descriptor else None)
        return ((rows - self.mean) / self.scale) @ self.weights + self.bias

    def to_metadata(self) -> dict[str, Any]:
        """JSON form, stored under "ood" → "exposure"."""
        names = ["log1p(pooled features)", *EXPOSURE_INPUTS]
        if self.uses_descriptor:
            names.append("descriptor (16-bin histogram, 8x8 thumbnail, 8-bin edge histogram, "
                         "7 head-shape measurements)")
        return {"inputs": names, "uses_descriptor": self.uses_descriptor,
                "mean": np.round(self.mean, 6).tolist(), "scale": np.round(self.scale, 6).tolist(),
                "weights": np.round(self.weights, 6).tolist(), "bias": round(float(self.bias), 6)}

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> Exposure:
        """Rebuild the head from its metadata block."""
        return cls(np.asarray(meta["mean"], np.float64), np.asarray(meta["scale"], np.float64),
                   np.asarray(meta["weights"], np.float64), float(meta["bias"]),
                   bool(meta.get("uses_descriptor", False)))


def fit_exposure(positives: np.ndarray, negatives: np.ndarray, C: float = 1.0,  # noqa: N803
                 negative_weights: np.ndarray | None = None,
                 uses_descriptor: bool = False) -> Exposure:
    """Class-balanced, L2-regularised logistic regression (scikit-learn's lbfgs).

    Args:
        positives: `Exposure.inputs` rows of in-distribution images (the training split).
        negatives: the same for images that must be refused.
        C: scikit-learn's inverse penalty on the standardised weights. 1.0 refused more of the
            held-out real categories than 0.1 or 0.017 (`experiments/guard_features.py` and
            the calibrate report), at the same false refusals on test slices.
        negative_weights: relative weight of each negative (e.g. equal per category); the
            negatives together always weigh as much as the positives.
        uses_descriptor: the rows end with `descriptor` columns (recorded in the metadata).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rows = np.concatenate([positives, negatives])
    target = np.r_[np.ones(len(positives)), np.zeros(len(negatives))]
    scaler = StandardScaler().fit(rows)
    scaler.scale_ = scaler.scale_ + 1e-6  # constant columns (a channel that never fires)
    z = scaler.transform(rows)
    neg = np.ones(len(negatives)) if negative_weights is None else np.asarray(negative_weights, float)
    # Each side weighs half, whatever the counts.
    sample_weight = np.r_[np.full(len(positives), 0.5 / len(positives)), 0.5 * neg / neg.sum()]
    sample_weight *= len(rows)
    model = LogisticRegression(C=C, max_iter=5000)
    model.fit(z, target, sample_weight=sample_weight)
    return Exposure(scaler.mean_, scaler.scale_, model.coef_[0].astype(np.float64),
                    float(model.intercept_[0]), uses_descriptor)


@dataclass(frozen=True)
class OODGuard:
    """Fitted bounds per feature plus class centroids of the network's pooled features."""

    bounds: dict[str, tuple[float | None, float | None]]
    centroids: np.ndarray  # (classes, dims)
    whitening: np.ndarray  # (dims, dims): W @ W.T is the inverse of the shared covariance
    info: dict[str, Any] = field(default_factory=dict)
    exposure: Exposure | None = None
    # One-class check on the appearance `descriptor`: (mean, whitening) of the training slices.
    # It needs no negatives, so it holds for kinds of image no exposure negative showed.
    appearance: tuple[np.ndarray, np.ndarray] | None = None
    # The guard network (`guardnet.GuardNet`, loaded by the predictor from the file that
    # metadata "network" names); its bounds are bounds["brain_likeness"] and, when its
    # metadata fits one, bounds["brain_distance"].
    network: Any = None

    def appearance_distance(self, descriptors: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of each descriptor row to the training slices, per dim."""
        return gaussian_distance(descriptors, *self.appearance)

    def distance(self, embedding: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance to the nearest class centroid, per dimension, per row."""
        emb = np.atleast_2d(np.asarray(embedding, np.float64))
        diff = (emb[:, None, :] - self.centroids[None]) @ self.whitening
        return (diff**2).mean(axis=2).min(axis=1)

    def model_scores(self, embeddings: np.ndarray, features: Mapping[str, np.ndarray],
                     descriptors: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The scores that need the network's pooled features, one value per row."""
        scores = {"feature_distance": self.distance(embeddings)}
        if self.exposure is not None:
            scores["mri_likeness"] = self.exposure.score(embeddings, features, descriptors)
        if self.appearance is not None and descriptors is not None:
            scores["appearance_distance"] = self.appearance_distance(descriptors)
        return scores

    def check(self, features: Mapping[str, float]) -> Verdict:
        """Refuse when any measured feature lies outside its fitted bounds."""
        reasons = []
        for name, (low, high) in self.bounds.items():
            if name not in features:
                continue
            value = features[name]
            if (low is not None and value < low) or (high is not None and value > high):
                reasons.append(name)
        return Verdict(bool(reasons), tuple(reasons), {k: float(v) for k, v in features.items()})

    def assess(self, model_input: np.ndarray, colourfulness: float | None,
               embedding: np.ndarray | None, peak_brightness: float | None = None) -> Verdict:
        """Measure one input (with its file's colour and peak brightness and the network's
        pooled features, when known) and check it."""
        return self.assess_many([model_input], [colourfulness], embedding, [peak_brightness])[0]

    def assess_many(self, model_inputs, colours, embeddings: np.ndarray | None,
                    peaks=None) -> list[Verdict]:
        """Measure and check several inputs; the guard network runs once for all of them.

        Args:
            model_inputs: preprocessed inputs, each (size, size, 1) in [0, 1].
            colours: each input's file colour (`imaging.read_scan`; None: grey, not measured).
            embeddings: the classifier's pooled features, (N, C), or None when unknown.
            peaks: each input's file peak brightness (`imaging.read_scan`; None, or no list:
                not measured, not checked).
        """
        peaks = list(peaks) if peaks is not None else [None] * len(model_inputs)
        rows = [image_features(x, colour, peak)
                for x, colour, peak in zip(model_inputs, colours, peaks)]
        if not rows:
            return []
        if embeddings is not None and len(self.centroids):
            uses = (self.exposure is not None and self.exposure.uses_descriptor
                    or self.appearance is not None)
            descriptors = np.stack([descriptor(x) for x in model_inputs]) if uses else None
            features = {name: np.array([row[name] for row in rows]) for name in rows[0]}
            scores = self.model_scores(embeddings, features, descriptors)
            for i, row in enumerate(rows):
                row.update({name: float(values[i]) for name, values in scores.items()})
        if self.network is not None:  # "brain_likeness", and "brain_distance" when fitted
            for name, values in self.network.scores(np.stack(model_inputs)).items():
                for row, value in zip(rows, values):
                    row[name] = float(value)
        return [self.check(row) for row in rows]

    def to_metadata(self) -> dict[str, Any]:
        """JSON form stored under "ood" in the model metadata."""
        return {
            "bounds": {name: [None if v is None else round(float(v), 6) for v in pair]
                       for name, pair in self.bounds.items()},
            "centroids": np.round(self.centroids, 5).tolist(),
            # float32, row-major, base64: a 128×128 matrix as JSON numbers would be ~200 KB.
            "whitening_float32_base64": base64.b64encode(
                self.whitening.astype("<f4").tobytes()).decode("ascii"),
            **({"exposure": self.exposure.to_metadata()} if self.exposure is not None else {}),
            **({"appearance": gaussian_to_metadata(*self.appearance)}
               if self.appearance is not None else {}),
            **self.info,
        }

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], network: Any = None) -> OODGuard:
        """Rebuild the guard from the model metadata's "ood" block (and its loaded network)."""
        bounds = {name: (pair[0], pair[1]) for name, pair in meta["bounds"].items()}
        centroids = np.asarray(meta["centroids"], np.float64)
        dims = centroids.shape[1]
        whitening = np.frombuffer(base64.b64decode(meta["whitening_float32_base64"]), "<f4")
        info = {k: v for k, v in meta.items()
                if k not in ("bounds", "centroids", "whitening_float32_base64", "exposure",
                             "appearance")}
        exposure = Exposure.from_metadata(meta["exposure"]) if "exposure" in meta else None
        appearance = gaussian_from_metadata(meta["appearance"]) if "appearance" in meta else None
        return cls(bounds, centroids, whitening.reshape(dims, dims).astype(np.float64), info,
                   exposure, appearance, network)


def fit_gaussian(rows: np.ndarray, shrinkage: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Mean and whitening of `rows` (N, dims): one Gaussian, its covariance shrunk towards a
    scaled identity so that it is invertible when some dimensions never vary."""
    rows = np.asarray(rows, np.float64)
    cov = np.atleast_2d(np.cov(rows, rowvar=False))
    average = np.trace(cov) / len(cov) or 1.0
    cov = (1 - shrinkage) * cov + shrinkage * average * np.eye(len(cov))
    # Cholesky of the precision: ||(x - mu) @ W||² is the squared Mahalanobis distance.
    return rows.mean(axis=0), np.linalg.cholesky(np.linalg.inv(cov))


def gaussian_to_metadata(mean: np.ndarray, whitening: np.ndarray) -> dict[str, Any]:
    """JSON form of a `fit_gaussian` fit: the mean, and the whitening as float32 base64."""
    return {"mean": np.round(np.asarray(mean, np.float64), 6).tolist(),
            # float32, row-major, base64: a 128×128 matrix as JSON numbers would be ~200 KB.
            "whitening_float32_base64": base64.b64encode(
                np.asarray(whitening).astype("<f4").tobytes()).decode("ascii")}


def gaussian_from_metadata(meta: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(mean, whitening) from `gaussian_to_metadata`'s form."""
    mean = np.asarray(meta["mean"], np.float64)
    white = np.frombuffer(base64.b64decode(meta["whitening_float32_base64"]), "<f4")
    return mean, white.reshape(len(mean), len(mean)).astype(np.float64)


def gaussian_distance(rows: np.ndarray, mean: np.ndarray, whitening: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance of each row to a `fit_gaussian` fit, per dimension."""
    diff = (np.atleast_2d(np.asarray(rows, np.float64)) - mean) @ whitening
    return (diff**2).mean(axis=1)


def fit_prototypes(rows: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Which of `count` k-means clusters (scikit-learn's MiniBatchKMeans) each row falls in.

    The brain slices' features are many looks (collections, sequences, planes, zoom), not one
    cloud: one Gaussian wide enough for all of them also covers a knee or an abdomen, while the
    nearest of many cluster centres stays close to every look and far from what lies between.
    """
    from sklearn.cluster import MiniBatchKMeans

    rows = np.asarray(rows, np.float64)
    count = min(count, len(rows))
    return MiniBatchKMeans(count, random_state=seed, n_init=3, batch_size=2048).fit_predict(rows)


def cluster_means(rows: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """(K, dims) mean of the rows of each cluster, in the order of the sorted cluster labels."""
    rows = np.asarray(rows, np.float64)
    _, inverse, counts = np.unique(clusters, return_inverse=True, return_counts=True)
    sums = np.zeros((len(counts), rows.shape[1]))
    np.add.at(sums, inverse, rows)
    return sums / counts[:, None]


def prototype_distance(rows: np.ndarray, prototypes: np.ndarray,
                       squared_norms: np.ndarray | None = None) -> np.ndarray:
    """Squared Euclidean distance of each row to its nearest prototype, per dimension
    (`squared_norms`: the prototypes' own, when the caller keeps them)."""
    rows = np.atleast_2d(np.asarray(rows, np.float64))
    prototypes = np.asarray(prototypes, np.float64)
    if squared_norms is None:
        squared_norms = (prototypes**2).sum(1)
    # |x - c|² = |x|² - 2 x·c + |c|²: one matrix product instead of an (N, K, dims) array.
    squared = (rows**2).sum(1)[:, None] - 2.0 * rows @ prototypes.T + squared_norms[None, :]
    return np.maximum(squared.min(axis=1), 0.0) / rows.shape[1]


def _bound(values: np.ndarray, side: str, tail: float, margin: float,
           slack: float = 0.0) -> tuple[float | None, float | None]:
    """[low, high] at the `tail` quantiles, widened by `margin` times their distance to the
    median, and by at least `slack`."""
    median = float(np.median(values))
    low = high = None
    if side in ("low", "both"):
        q = float(np.quantile(values, tail))
        low = q - max(margin * (median - q), slack)
    if side in ("high", "both"):
        q = float(np.quantile(values, 1.0 - tail))
        high = q + max(margin * (q - median), slack)
    return low, high


DISTANCE_MARGINS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


def choose_margin(values: np.ndarray, tail: float, max_refusal: float,
                  margins: tuple[float, ...] = DISTANCE_MARGINS, rounds: int = 50,
                  seed: int = 0) -> float:
    """Smallest margin whose bound, fitted on a random half of `values`, refuses at most
    `max_refusal` of the other half on average over `rounds` halvings.

    The extreme tail of ~400 validation distances is noisy, so a bound at its quantile refuses
    more unseen in-distribution images than it did validation ones (measured: 0.8 % of val,
    2.3 % of test with a fixed margin of 0.25). Cross-fitting within the validation split
    estimates that optimism without looking at any test image.
    """
    values = np.asarray(values, np.float64)
    rng = np.random.default_rng(seed)
    halves = []
    for _ in range(rounds):
        order = rng.permutation(len(values))
        halves.append((values[order[: len(values) // 2]], values[order[len(values) // 2 :]]))
    for candidate in margins:
        rates = [float((held > _bound(fit, "high", tail, candidate)[1]).mean()) for fit, held in halves]
        if np.mean(rates) <= max_refusal:
            return candidate
    return margins[-1]


def fit_guard(val_features: Mapping[str, np.ndarray], train_embeddings: np.ndarray,
              train_labels: np.ndarray, val_embeddings: np.ndarray, tail: float = 0.0025,
              margin: float = 0.5, distance_tail: float = 0.005,
              distance_margin: float | None = None, shrinkage: float = 0.01,
              max_distance_refusal: float = 0.005, exposure: Exposure | None = None,
              val_descriptors: np.ndarray | None = None,
              train_descriptors: np.ndarray | None = None) -> OODGuard:
    """Fit the guard: centroids on the training split, every bound on the validation split.

    Args:
        val_features: feature name -> values on the validation split (see `image_features`).
        train_embeddings: pooled last-conv features of the training split, (N, dims).
        train_labels: integer class of each training row.
        val_embeddings: pooled features of the validation split (for the distance bound).
        tail: quantile of each cheap feature's tail left outside before widening.
        margin: how far beyond that quantile the bound sits, as a multiple of its distance to
            the median (room for the test data, which the fit never sees).
        distance_tail, distance_margin: the same for the feature distance; when the margin is
            None it is chosen by `choose_margin` so that cross-fitted refusals of held-out
            validation images stay under `max_distance_refusal`.
        shrinkage: weight of the scaled identity mixed into the shared covariance, so that it
            is invertible when some channels never fire.
        exposure: the outlier-exposure head (`fit_exposure`, fitted on the training split); its
            low bound is set on the validation split with `distance_tail` and `margin`.
        val_descriptors: `descriptor` rows of the validation split, for a head that uses them
            and for the appearance distance's bound.
        train_descriptors: `descriptor` rows of the training split; given, the one-class
            appearance distance is fitted (shared `shrinkage`) and bounded like the feature
            distance.
    """
    classes = np.unique(train_labels)
    train_embeddings = np.asarray(train_embeddings, np.float64)
    centroids = np.stack([train_embeddings[train_labels == c].mean(axis=0) for c in classes])
    residual = train_embeddings - centroids[np.searchsorted(classes, train_labels)]
    covariance = np.atleast_2d(np.cov(residual, rowvar=False))
    dims = covariance.shape[0]
    average = np.trace(covariance) / dims or 1.0
    covariance = (1 - shrinkage) * covariance + shrinkage * average * np.eye(dims)
    # Cholesky of the precision: ||(x - mu) @ W||² is the squared Mahalanobis distance.
    whitening = np.linalg.cholesky(np.linalg.inv(covariance))
    bounds = {name: _bound(np.asarray(val_features[name], np.float64), FEATURES[name][0], tail,
                           margin, FEATURES[name][1])
              for name in FEATURES if name in val_features and name not in FIXED_BOUNDS}
    bounds.update(FIXED_BOUNDS)
    guard = OODGuard(bounds, centroids, whitening)
    distances = guard.distance(val_embeddings)
    if distance_margin is None:
        distance_margin = choose_margin(distances, distance_tail, max_distance_refusal)
    bounds["feature_distance"] = _bound(distances, "high", distance_tail, distance_margin)
    if exposure is not None:
        likeness = exposure.score(val_embeddings, val_features, val_descriptors)
        bounds["mri_likeness"] = _bound(likeness, "low", distance_tail, margin)
    appearance = None
    info = {"tail": tail, "margin": margin, "distance_tail": distance_tail,
            "distance_margin": distance_margin, "shrinkage": shrinkage,
            "max_distance_refusal": max_distance_refusal}
    if train_descriptors is not None and val_descriptors is not None:
        appearance = fit_gaussian(train_descriptors, shrinkage)
        probe = OODGuard(bounds, centroids, whitening, appearance=appearance)
        far = probe.appearance_distance(val_descriptors)
        info["appearance_margin"] = choose_margin(far, distance_tail, max_distance_refusal)
        bounds["appearance_distance"] = _bound(far, "high", distance_tail,
                                               info["appearance_margin"])
    return OODGuard(bounds, centroids, whitening, info, exposure, appearance)
