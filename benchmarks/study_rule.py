"""Choose and measure the study summary rule on held-out patients (issue 34).

Studies are built from `../shared/data/lgg/` and `../shared/data/brats/`: one study per patient
and sequence, its slices in file-name order, read with `imaging.read_study` and screened with
`inference.screen_study` exactly as the page and the API do (guard, calibration, "uncertain",
blank slices left out). Patients:

- LGG validation patients of the model's split manifest (`model/<name>.splits.json`): never
  trained on, but used for early stopping and calibration; the rule is CHOSEN on them.
- LGG test patients of the manifest and every BraTS patient (the current models never trained
  on brats/): the rule is REPORTED on them.

Tumour studies: every slice of a patient and sequence (tumour and no-tumour slices). Patient-level
sensitivity: a patient counts as found when the rule says "tumor" on all of their sequences'
studies (also given: on any). "Most suspicious in mask": the top-ranked slice of a tumour study is a
slice whose expert mask is non-empty. No-tumour proxy: the same patients' `no_tumor` slices alone
(a weak proxy: the same tumour-bearing heads, slices next to or far from the tumour, no healthy
subjects).

    uv run --locked python benchmarks/study_rule.py               # the default served model
    uv run --locked python benchmarks/study_rule.py --model model/brainmri_cnn.h5 --out reports/study_rule.json
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from brainmri.config import DEFAULTS  # noqa: E402
from brainmri.imaging import read_study  # noqa: E402
from brainmri.inference import Predictor  # noqa: E402
from brainmri.inference import StudyRule  # noqa: E402
from brainmri.inference import default_model_path  # noqa: E402
from brainmri.inference import screen_study  # noqa: E402
from brainmri.inference import uncertain_threshold  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
RULES = [StudyRule(k, t) for k in (1, 2, 3, 5) for t in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)]


def lgg_patients(splits: Path) -> dict[str, str]:
    """LGG patient -> "val" or "test" from the model's split manifest (train left out)."""
    manifest = json.loads(splits.read_text())["splits"]
    sides: dict[str, set[str]] = defaultdict(set)
    for side, paths in manifest.items():
        for path in paths:
            if path.startswith("lgg/"):
                sides["_".join(Path(path).name.split("_")[:3])].add(side)
    return {patient: next(iter(s)) for patient, s in sides.items()
            if len(s) == 1 and next(iter(s)) in ("val", "test")}


def study_files(root: Path, patients: dict[str, str]) -> list[dict]:
    """One entry per (case, sequence): its files in name order and each slice's label."""
    rows = list(csv.DictReader((root / "slices.csv").read_text().splitlines()))
    studies: dict[tuple[str, str], dict] = {}
    for row in rows:
        if row["patient"] not in patients:
            continue
        for seq in row["sequences"].split():
            path = root / row["label"] / f"{row['slice']}_{seq}.jpg"
            if not path.is_file():
                continue
            key = (row["case"], seq)
            entry = studies.setdefault(key, {"patient": row["patient"], "case": row["case"],
                                             "sequence": seq, "side": patients[row["patient"]],
                                             "collection": root.name, "files": []})
            entry["files"].append((path, row["label"] != "no_tumor"))
    return list(studies.values())


def screen(predictor, threshold: float, files: list[tuple[Path, bool]]) -> list[dict]:
    """Each slice's tumour probability (None: blank, refused, unreadable) and mask flag."""
    study = read_study([(p.name, p.read_bytes()) for p, _ in files], predictor.input_size)
    result = screen_study(predictor, study, threshold)
    # read_study orders by name (natural order); map back to each file's mask flag.
    order = sorted(range(len(files)), key=lambda i: _natural(files[i][0].name))
    return [{"p": s.tumor_probability, "tumour": files[order[s.index]][1],
             "state": s.code, "uncertain": s.uncertain} for s in result.slices]


def _natural(name: str) -> list:
    import re

    return [int(x) if x.isdigit() else x.lower() for x in re.split(r"(\d+)", name)]


def evaluate(studies: list[dict], rule: StudyRule) -> dict:
    """Patient-level sensitivity, top slice in mask, and the no-tumour proxy's positives."""
    per_patient: dict[str, list[bool]] = defaultdict(list)
    in_mask = []
    proxy = []
    for study in studies:
        scored = [s for s in study["slices"] if s["p"] is not None]
        label = rule.score([s["p"] for s in scored])
        per_patient[study["patient"]].append(label is not None and label >= rule.threshold)
        if scored:
            top = max(scored, key=lambda s: s["p"])
            in_mask.append(top["tumour"])
        clean = [s["p"] for s in scored if not s["tumour"]]
        if clean:
            score = rule.score(clean)
            proxy.append(score >= rule.threshold)
    return {
        "patients": len(per_patient),
        "studies": len(studies),
        "sensitivity_all_sequences": sum(all(v) for v in per_patient.values()) / len(per_patient),
        "sensitivity_any_sequence": sum(any(v) for v in per_patient.values()) / len(per_patient),
        "study_sensitivity": sum(sum(v) for v in per_patient.values())
        / sum(len(v) for v in per_patient.values()),
        "most_suspicious_in_mask": sum(in_mask) / len(in_mask) if in_mask else None,
        "no_tumour_proxy_studies": len(proxy),
        "no_tumour_proxy_called_tumour": sum(proxy) / len(proxy) if proxy else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "study_rule.json")
    parser.add_argument("--dump", type=Path, default=None,
                        help="Also write every study's slices (probability, mask, state) here.")
    args = parser.parse_args()
    model = args.model or default_model_path(Path(DEFAULTS["BRAINMRI_MODEL_DIR"]))
    predictor = Predictor.from_path(model)
    predictor.load()
    threshold = uncertain_threshold(predictor, DEFAULTS["BRAINMRI_UNCERTAIN_BELOW"])
    lgg = lgg_patients(model.with_suffix(".splits.json"))
    brats = {row["patient"]: "test" for row in csv.DictReader((DATA / "brats/slices.csv").read_text().splitlines())}
    studies = study_files(DATA / "lgg", lgg) + study_files(DATA / "brats", brats)
    started = time.perf_counter()
    for study in studies:
        study["slices"] = screen(predictor, threshold, study.pop("files"))
    seconds = time.perf_counter() - started
    if args.dump:
        args.dump.write_text(json.dumps(studies))
    choose = [s for s in studies if s["side"] == "val"]
    report = [s for s in studies if s["side"] == "test"]
    table = []
    for rule in RULES:
        table.append({"k": rule.k, "threshold": rule.threshold,
                      "val": evaluate(choose, rule), "held_out": evaluate(report, rule)})
    # The chosen rule: on validation patients, every study found (sensitivity 1.0), then the
    # fewest no-tumour proxy studies called tumour, then the higher threshold.
    eligible = [row for row in table if row["val"]["study_sensitivity"] >= 0.99] or table
    chosen = min(eligible, key=lambda row: (row["val"]["no_tumour_proxy_called_tumour"],
                                            -row["threshold"], row["k"]))
    summary = {
        "model": model.name,
        "chosen": {"k": chosen["k"], "threshold": chosen["threshold"]},
        "chosen_val": chosen["val"],
        "chosen_held_out": chosen["held_out"],
        "held_out_by_collection": {
            name: evaluate([s for s in report if s["collection"] == name],
                           StudyRule(chosen["k"], chosen["threshold"]))
            for name in ("lgg", "brats")},
        "slices_screened": sum(len(s["slices"]) for s in studies),
        "blank": sum(x["state"] == "blank" for s in studies for x in s["slices"]),
        "refused": sum(x["state"] in ("not_brain_mri",) for s in studies for x in s["slices"]),
        "seconds": round(seconds, 1),
        "rules": table,
    }
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "rules"}, indent=1))


if __name__ == "__main__":
    main()
