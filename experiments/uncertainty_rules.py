"""Compare "uncertain" rules on held-out collections and sequences (issue 32's method choice).

For one trained model: fit each rule on the validation split only (the sequences the model
trained on), then report, for every held-out set and sequence, accuracy, any-tumour
sensitivity/specificity, and for each rule the share answered confidently (coverage) and how
often those confident answers are right. Guard-free: it judges the classifier and the flag.

    uv run python experiments/uncertainty_rules.py runs/e1/loso_flair_gin.h5 [--out x.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from brainmri.inference import Predictor
from brainmri.inference import calibration
from brainmri.inference.uncertainty import UncertaintyRule
from brainmri.inference.uncertainty import fit_feature_space
from brainmri.training.dataset import load_datasets
from brainmri.training.evaluation import eval_sets
from brainmri.training.metrics import binary_metrics
from brainmri.training.splits import splits_path_for

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
COLLECTIONS = ("sartaj", "lgg", "brats")


def forward(predictor, images, batch=256):
    probs, feats = [], []
    for i in range(0, len(images), batch):
        p, f = predictor.forward(images[i:i + batch])
        probs.append(p)
        feats.append(f)
    return np.concatenate(probs), np.concatenate(feats)


def shifted(images, seed=0):
    """The same slices under random tissue contrast (the training augmentation's GIN/curves)."""
    import tensorflow as tf

    from brainmri.training.trainer import randomise_contrast

    tf.random.set_seed(seed)
    out = [randomise_contrast(tf.constant(images[i:i + 256]), gin=0.6, remap=0.4).numpy()
           for i in range(0, len(images), 256)]
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--target", type=float, default=0.98)
    parser.add_argument("--quantile", type=float, default=0.95)
    args = parser.parse_args()
    predictor = Predictor.from_path(args.model, engine="keras")
    predictor.load()
    meta = predictor.card.raw
    excluded = set(meta["training"].get("excluded_sequences") or [])
    data = load_datasets([DATA / c for c in COLLECTIONS], predictor.input_size)
    manifest = json.loads(splits_path_for(args.model).read_text())
    index = {p: i for i, p in enumerate(data.paths)}
    splits = {k: np.array([index[p] for p in v if p in index]) for k, v in manifest["splits"].items()}
    keep = lambda idx: np.array([i for i in idx if data.sequences[i] not in excluded], int)
    train, val = keep(splits["train"]), keep(splits["val"])
    y = data.label_indices
    order = [predictor.labels.index(c) for c in ("glioma", "meningioma", "no_tumor", "pituitary")]
    assert order == [0, 1, 2, 3], "script assumes canonical output order"

    rng = np.random.default_rng(0)
    fit_rows = rng.choice(train, size=min(6000, len(train)), replace=False)
    _, train_f = forward(predictor, data.images[fit_rows])
    val_p, val_f = forward(predictor, data.images[val])
    temperature = calibration.fit_temperature(val_p, y[val])
    val_c = calibration.apply_temperature(val_p, temperature)
    centre, projection, means = fit_feature_space(train_f, y[fit_rows], 4)
    base = UncertaintyRule(0.0, 1e9, centre, projection, means)
    val_d = base.distances(val_f)[np.arange(len(val)), val_c.argmax(1)]
    bound = float(np.quantile(val_d, args.quantile))

    def threshold(conf, correct):
        return calibration.choose_uncertain_threshold(conf, correct, args.target)["uncertain_below"]

    correct_val = val_c.argmax(1) == y[val]
    t0 = threshold(val_c.max(1), correct_val)
    typical = val_d <= bound
    t1 = threshold(val_c.max(1)[typical], correct_val[typical])
    sh_p, sh_f = forward(predictor, shifted(data.images[val]))
    sh_c = calibration.apply_temperature(sh_p, temperature)
    sh_d = base.distances(sh_f)[np.arange(len(val)), sh_c.argmax(1)]
    pool_conf = np.concatenate([val_c.max(1), sh_c.max(1)])
    pool_ok = np.concatenate([correct_val, sh_c.argmax(1) == y[val]])
    pool_typ = np.concatenate([typical, sh_d <= bound])
    t2 = threshold(pool_conf[pool_typ], pool_ok[pool_typ])
    t3 = threshold(pool_conf, pool_ok)
    rules = {
        "U0 confidence (val)": UncertaintyRule(t0),
        "U1 confidence + distance (val)": UncertaintyRule(t1, bound, centre, projection, means),
        "U2 confidence + distance (val + contrast-shifted val)":
            UncertaintyRule(t2, bound, centre, projection, means),
        "U3 confidence (val + contrast-shifted val)": UncertaintyRule(t3),
    }
    report = {"model": str(args.model), "excluded_sequences": sorted(excluded),
              "temperature": temperature, "distance_bound": bound,
              "thresholds": {k: r.confidence_below for k, r in rules.items()}, "sets": {}}
    for s in eval_sets(data, manifest):
        if not len(s.indices) or s.name.endswith("/val") or s.name.endswith("/official_test"):
            continue
        p, f = forward(predictor, data.images[s.indices])
        c = calibration.apply_temperature(p, temperature)
        truth = y[s.indices]
        seqs = np.array([data.sequences[i] for i in s.indices])
        groups = {"all": np.ones(len(truth), bool)}
        groups |= {q: seqs == q for q in sorted(set(seqs.tolist()) - {"unspecified"})}
        for g, m in groups.items():
            if m.sum() == 0:
                continue
            ok = c[m].argmax(1) == truth[m]
            row = {"n": int(m.sum()), "accuracy": round(float(ok.mean()), 4),
                   **{k: v for k, v in binary_metrics(truth[m], c[m]).items()
                      if k in ("sensitivity", "specificity")}}
            for name, rule in rules.items():
                conf = ~rule.flags(c[m], f[m])
                row[name] = {"coverage": round(float(conf.mean()), 4),
                             "precision": round(float(ok[conf].mean()), 4) if conf.any() else None}
            report["sets"][f"{s.name}:{g}"] = row
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text)
    print(f"T={temperature:.3f} bound={bound:.3f} thresholds={report['thresholds']}")
    short = {k: k.split()[0] for k in rules}
    for key, row in report["sets"].items():
        cells = " ".join(f"{short[k]} {row[k]['coverage']:.2f}/{row[k]['precision'] if row[k]['precision'] is not None else float('nan'):.3f}"
                         for k in rules)
        print(f"{key:40s} n={row['n']:5d} acc={row['accuracy']:.3f} sens={row.get('sensitivity', float('nan'))} "
              f"spec={row.get('specificity', float('nan'))} | {cells}")


if __name__ == "__main__":
    sys.exit(main())
