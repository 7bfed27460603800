"""Is the share of clipped-white pixels a head-CT cue the guard could use? (Measured: no.)

    uv run python experiments/guard_saturation.py                 # ../shared/data
    uv run python experiments/guard_saturation.py --data-root DIR --tail 0.0025 --margin 0.5

Head CT is the kind of image the guard lets through most (docs/research.md). A CT exported in a
brain window clips bone to white, so a large share of the head sits at the file's maximum; an
MRI export is scaled to its brightest pixel, so almost none does. This measures that share on
each file's decoded pixels (before preprocessing, which stretches every slice's top 0.5 % to
white) and bounds it one-class, like the guard's other cheap checks (`ood._bound` on the
validation slices of both collections: the `--tail` quantile, widened by `--margin` times its
distance to the median). It prints the share of every `ood_train/` category past the bound and
the brain slices of the held-out sets (SARTAJ test, the official Testing folder, LGG's test
patients; audited CT and almost-black files apart, as `guard_imagenet_trunk.held_out_brain_sets`
selects them) that it would refuse, by name.

What it showed on 2026-12-04 (`--tail 0.0025 --margin 0.5`, the cheap checks' own): the bound
is 0.057 (validation median 0, 99.5th percentile 0.020). Past it lie 91 % of real head CT, but
also 12 of 358 official Testing slices and 7 of 390 SARTAJ test slices: post-contrast T1
teaching slices whose scalp fat, marrow or enhancing tumour was exported clipped. Only a bound
read off those test slices (`--bound 0.19`, above the worst, 0.188) refuses none of them, and it
keeps half the head CT (51 %); no bound set on validation alone would choose it. As a learnt
input to the guard's head (scratch runs on the `guard_imagenet_trunk.py` folds) it raised
held-out head CT from 65 % to 75-86 % and official Testing refusals from 3 to 3-5 of 358; with
windowed (clipped) copies of training slices among the positives, so that clipping alone is not
read as CT, head CT fell back to 69 %. It was therefore not shipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def saturated_share(data: bytes) -> float:
    """Share of a file's non-background pixels (above 5 % of its maximum) within 2 % of it."""
    from brainmri.imaging.decode import decode_image

    grey = np.asarray(decode_image(data), np.float32)
    head = grey[grey > grey.max() * 0.05]
    return float((head >= grey.max() * 0.98).mean()) if head.size else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--splits", type=Path, default=ROOT / "model" / "brainmri_cnn.splits.json")
    parser.add_argument("--tail", type=float, default=0.0025, help="as the cheap checks' tail")
    parser.add_argument("--margin", type=float, default=0.5, help="as the cheap checks' margin")
    parser.add_argument("--bound", type=float, help="judge at this bound instead of the fitted one")
    args = parser.parse_args()

    from brainmri.inference import ood
    from brainmri.training import ood_sets
    from brainmri.training.trust import _split_indices
    from brainmri.training.trust import listed_not_mri

    from experiments.guard_imagenet_trunk import held_out_brain_sets

    # The same slices the guard network's bounds and false-refusal figures are measured on.
    manifest = json.loads(args.splits.read_text())
    data, brain_sets = held_out_brain_sets(args.data_root, manifest)
    splits = _split_indices(data, manifest)  # blank slices apart, as the guard's bounds

    def shares(indices) -> np.ndarray:
        return np.array([saturated_share(data.file(i).read_bytes()) for i in indices])

    val = shares(splits["val"])
    _, bound = ood._bound(val, "high", args.tail, args.margin)
    bound = bound if args.bound is None else args.bound
    print(f"bound {bound:.3f} (validation: {len(val)} slices, median {np.median(val):.3f}, "
          f"99.5th percentile {np.percentile(val, 99.5):.3f})\n")
    by_category: dict[str, list[float]] = {}
    for negative in ood_sets.real_negatives(args.data_root / "ood_train"):
        try:
            by_category.setdefault(negative.category, []).append(
                saturated_share(negative.path.read_bytes()))
        except Exception:  # noqa: BLE001 - refused by the decoder before any guard
            continue
    for category, values in sorted(by_category.items()):
        values = np.array(values)
        print(f"  {category:>38}: {(values > bound).mean():.3f} past the bound "
              f"({len(values)}, median {np.median(values):.3f})")
    print()
    for name, kept in brain_sets.items():
        refused = [data.paths[i] for i, v in zip(kept, shares(kept)) if v > bound]
        print(f"  {name}: {len(refused)}/{len(kept)} brain slices refused {refused[:5]}")
    not_mri = listed_not_mri()
    audited = shares([i for i in splits["official_test"] if data.paths[i] in not_mri])
    print(f"  audited head CT in the official Testing folder: {int((audited > bound).sum())}/"
          f"{len(audited)} past the bound")

if __name__ == "__main__":
    main()
