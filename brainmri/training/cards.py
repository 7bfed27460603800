"""Model cards and the documentation's figures, generated from what was measured.

One card per served model (``docs/models/<name>.md``), in the form of Mitchell et al., "Model
Cards for Model Reporting" (FAT* 2019), as Hugging Face lays it out: details, uses, training and
evaluation data, results by collection and sequence, calibration, the input guard, limitations
and the training procedure. Every figure comes from the model's metadata JSON and its
``reports/**/metrics.json`` (the report whose ``model.sha256`` matches the file), plus
``reports/compare.json``; nothing is typed by hand, so a card cannot drift from the reports.

The README and the documentation pages quote the same figures through marked blocks,
``<!-- generated:KEY -->`` ... ``<!-- /generated:KEY -->``, which `render_all` fills in. Sections
of a report this module does not know (a new leave-one-out protocol, say) are rendered generically,
so a retrained model's new report keys reach its card by re-running ``brainmri docs``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

from ..inference import DISCLAIMER
from ..inference import default_model_path
from ..inference import discover_models
from ..inference import metadata_path_for

__all__ = ["CARDS_DIR", "GENERATOR_COMMAND", "ModelDocs", "load_models", "render_all",
           "render_card", "stale_files", "write_all"]

GENERATOR_COMMAND = "uv run brainmri docs"
CARDS_DIR = Path("docs") / "models"
# Files whose marked blocks `render_all` fills in (relative to the project root), besides the cards.
BLOCK_FILES = ("README.md", "docs/index.md", "docs/models.md", "docs/trust.md", "mkdocs.yml")
_BLOCK = re.compile(r"(<!-- generated:(?P<key>[a-z-]+) -->\n)(?P<body>.*?)(<!-- /generated:(?P=key) -->)",
                    re.S)
# The same in mkdocs.yml's nav, as YAML comments: `# generated:KEY ...` ... `# /generated:KEY`.
_YAML_BLOCK = re.compile(r"(?P<indent>[ ]*)(# generated:(?P<key>[a-z-]+)[^\n]*\n)(?P<body>.*?)"
                         r"(?P=indent)(# /generated:(?P=key))", re.S)

# Where each collection comes from (text, not figures: ../shared/data/<name>/README.md has more).
PROVENANCE = {
    "sartaj": "SARTAJ \"Brain Tumor Classification (MRI)\" (Bhuvaji et al., 2020; GitHub "
              "SartajBhuvaji/Brain-Tumor-Classification-DataSet and Kaggle): 3,264 JPEG slices in "
              "four classes, mixed planes and sequences. Most tumour slices are the figshare "
              "T1-contrast set of Cheng et al. (2015), most no-tumour slices Br35H, so the "
              "collection predicts the label; its official Testing folder shares near-copies "
              "with Training.",
    "lgg": "TCGA lower-grade glioma slices as prepared by Buda, Saha & Mazurowski (2019): 110 "
           "patients from five institutions, axial, T1, post-contrast T1 and FLAIR, with a "
           "tumour mask per slice; glioma and no-tumour slices come from the same patients and "
           "scanners.",
    "brats": "BraTS glioma patients (Menze et al. 2015; Bakas et al. 2017, 2018) from the demo "
             "sets of two public repositories: pre- and post-contrast T1 from several centres, "
             "labelled per slice from the expert segmentation.",
    "harvard_mri": "The Harvard Whole Brain Atlas: brain MRI slices, mostly T2, 1990s scanners; "
                   "unlabelled.",
}
SET_NAMES = {
    "test": "held-out test",
    "val": "validation",
    "unseen": "all of it (never trained on)",
    "official_test": "official Testing folder",
    "official_test_novel": "official Testing, no near-copy in training",
}
SEQUENCES = {"t1": "T1", "t1c": "T1 post-contrast", "t2": "T2", "flair": "FLAIR", "mixed": "mixed"}
# Report sections rendered by name below; any other top-level key is rendered generically.
KNOWN_REPORT_KEYS = {"model", "data", "trained_on", "split_manifest", "sets", "pointing", "plots",
                     "trust"}
KNOWN_TRUST_KEYS = {"temperature", "uncertain_below", "calibration", "false_refusal", "ood",
                    "no_head_in_view"}


@dataclass
class ModelDocs:
    """One served model's metadata and the reports measured on that very file."""

    name: str
    path: Path  # the .h5, relative to the project root
    meta: dict[str, Any]
    report: dict[str, Any] | None = None
    report_path: Path | None = None
    report_note: str = ""  # set when the report was measured on another file
    comparison: dict[str, Any] | None = None
    default: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def card_path(self) -> Path:
        """The card's path relative to the project root."""
        return CARDS_DIR / f"{self.name}.md"


# ---------------------------------------------------------------------------------------------
# Reading


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def load_models(root: Path) -> list[ModelDocs]:
    """Every model in ``root/model`` (the default first) with its reports, without TensorFlow."""
    model_dir = root / "model"
    paths = discover_models(model_dir)
    if not paths:
        return []
    default = default_model_path(model_dir).stem
    reports = []
    for path in sorted((root / "reports").rglob("metrics.json")):
        data = _read_json(path)
        if data:
            reports.append((path, data))
    comparison = _read_json(root / "reports" / "compare.json") or {}
    compared = {entry.get("name"): entry for entry in comparison.get("models", [])}
    models = []
    for path in paths:
        meta = _read_json(metadata_path_for(path)) or {}
        name = str(meta.get("name", path.stem))
        docs = ModelDocs(name=name, path=path.relative_to(root), meta=meta, default=(name == default))
        matching = [(p, r) for p, r in reports if (r.get("model") or {}).get("sha256") == meta.get("sha256")]
        if not matching:
            # Same name, another file: say so rather than quote figures as this file's.
            matching = [(p, r) for p, r in reports if (r.get("model") or {}).get("name") == name]
            if matching:
                docs.report_note = (
                    f"The report below was measured on another file of this name (sha256 "
                    f"{str(matching[0][1]['model'].get('sha256'))[:12]}…, version "
                    f"{matching[0][1]['model'].get('version')}); re-run `brainmri evaluate`.")
        if matching:
            # Prefer reports/<name>/metrics.json, then reports/metrics.json, then any other.
            matching.sort(key=lambda item: (item[0].parent.name != name,
                                            item[0].parent != root / "reports", str(item[0])))
            docs.report_path = matching[0][0].relative_to(root)
            docs.report = matching[0][1]
        docs.comparison = compared.get(name)
        link = (meta.get("ood") or {}).get("network") or {}
        if link.get("file"):
            guard = _read_json(model_dir / Path(link["file"]).with_suffix(".json"))
            if guard:
                docs.extra["guard"] = guard
                docs.extra["guard_path"] = (Path("model") / link["file"]).with_suffix(".json")
        models.append(docs)
    models.sort(key=lambda docs: not docs.default)
    return models


# ---------------------------------------------------------------------------------------------
# Formatting helpers


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value and abs(value) < 10 ** -digits:
            return f"{value:.2g}"
        return f"{value:.{digits}f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_num(item, digits) for item in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100 * float(value):.1f} %"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        return []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _title(key: str) -> str:
    words = key.replace("_", " ").replace("-", " ").strip()
    return words[:1].upper() + words[1:]


def set_label(key: str) -> str:
    """'lgg/test' -> 'LGG held-out test'; unknown set names are kept as they are."""
    collection, _, name = key.partition("/")
    if not name:
        return SEQUENCES.get(key, key)
    suffix = ""
    if " (" in name:
        name, suffix = name.split(" (", 1)
        suffix = " (" + suffix
    return f"{collection.upper()} {SET_NAMES.get(name, name.replace('_', ' '))}{suffix}"


def _sequence(name: str) -> str:
    return SEQUENCES.get(name, name)


def _scalars(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if not isinstance(v, (dict, list)) or
            (isinstance(v, list) and all(not isinstance(i, (dict, list)) for i in v) and len(v) <= 4)}


def generic(value: Any, level: int = 3) -> list[str]:
    """Any JSON value as Markdown: scalars as a list, a dict of dicts as a table, deeper as sections."""
    if not isinstance(value, dict):
        return [f"- {_num(value)}", ""]
    scalars = _scalars(value)
    nested = {k: v for k, v in value.items() if k not in scalars}
    lines: list[str] = []
    if scalars:
        lines += _table(["", "value"], [[_title(k), _num(v)] for k, v in scalars.items()])
    rowish = {k: v for k, v in nested.items() if isinstance(v, dict) and v and
              all(not isinstance(x, dict) or len(x) <= 12 for x in v.values())}
    if len(rowish) >= 2 or (rowish and len(rowish) == len(nested)):
        columns: list[str] = []
        for entry in rowish.values():
            for k, v in _scalars(entry).items():
                if k not in columns:
                    columns.append(k)
        if columns:
            rows = [[set_label(k)] + [_num(_scalars(entry).get(c)) for c in columns]
                    for k, entry in rowish.items()]
            lines += _table([""] + [_title(c) for c in columns], rows)
            for k, entry in rowish.items():
                for sub, subvalue in entry.items():
                    if sub not in _scalars(entry) and subvalue:
                        lines += [f"{'#' * min(level, 6)} {set_label(k)}: {_title(sub)}", ""]
                        lines += generic(subvalue, min(level + 1, 6))
            nested = {k: v for k, v in nested.items() if k not in rowish}
    for k, v in nested.items():
        if isinstance(v, list):
            rows = [item for item in v if isinstance(item, dict)]
            columns = list(dict.fromkeys(c for item in rows for c in _scalars(item)))
            lines += [f"{'#' * min(level, 6)} {_title(k)}", ""]
            if rows and columns:
                lines += _table([_title(c) for c in columns],
                                [[_num(_scalars(item).get(c)) for c in columns] for item in rows])
            else:
                lines += [f"- {_num(v)}" if len(v) <= 12 else f"- {len(v)} entries", ""]
            continue
        lines += [f"{'#' * min(level, 6)} {_title(k)}", ""]
        lines += generic(v, min(level + 1, 6))
    return lines


# ---------------------------------------------------------------------------------------------
# Shared figures


def _sets(docs: ModelDocs) -> dict[str, Any]:
    if docs.report:
        return docs.report.get("sets") or {}
    return docs.meta.get("evaluation") or {}


def _sensitivity(entry: dict[str, Any]) -> Any:
    if "sensitivity" in entry:
        return entry.get("sensitivity")
    return (entry.get("tumor_vs_no_tumor") or {}).get("sensitivity")


def _specificity(entry: dict[str, Any]) -> Any:
    if "specificity" in entry:
        return entry.get("specificity")
    return (entry.get("tumor_vs_no_tumor") or {}).get("specificity")


def held_out_rows(docs: ModelDocs) -> list[tuple[str, str, dict[str, Any]]]:
    """(set, sequence, figures) for every set a user's scans resemble: not validation, not the
    official Testing folder with its near-copies of training; one row per MRI sequence."""
    rows = []
    for key, entry in _sets(docs).items():
        name = key.partition("/")[2]
        if name in ("val", "official_test") or not isinstance(entry, dict):
            continue
        by_sequence = entry.get("by_sequence") or {}
        if by_sequence:
            for sequence, figures in sorted(by_sequence.items()):
                if isinstance(figures, dict):
                    rows.append((key, sequence, figures))
        else:
            rows.append((key, "mixed", {"images": entry.get("images"), "accuracy": entry.get("accuracy"),
                                        "sensitivity": _sensitivity(entry),
                                        "specificity": _specificity(entry)}))
    return rows


def _trained_on(docs: ModelDocs) -> list[str]:
    return list((docs.report or {}).get("trained_on") or (docs.meta.get("training") or {}).get("collections") or [])


def figures_table(docs: ModelDocs) -> list[str]:
    """The held-out figures per set and sequence, as a Markdown table."""
    trained = _trained_on(docs)
    rows = []
    for key, sequence, figures in held_out_rows(docs):
        collection = key.partition("/")[0]
        rows.append([set_label(key), "yes" if collection in trained else "**no**", _sequence(sequence),
                     _num(figures.get("images")), _num(figures.get("accuracy")),
                     _num(figures.get("sensitivity")), _num(figures.get("specificity"))])
    return _table(["set", "collection in training", "sequence", "images", "accuracy (4 classes)",
                   "tumour found (sensitivity)", "no tumour recognised (specificity)"], rows)


def weakest(docs: ModelDocs, count: int = 3) -> list[str]:
    """The lowest held-out sensitivity and specificity figures, in plain words."""
    figures = []
    for key, sequence, entry in held_out_rows(docs):
        for metric in ("sensitivity", "specificity"):
            value = entry.get(metric)
            if value is not None:
                figures.append((float(value), metric, key, sequence))
    lines = []
    for value, metric, key, sequence in sorted(figures)[:count]:
        where = f"{set_label(key)}, {_sequence(sequence)}"
        if metric == "sensitivity":
            lines.append(f"- misses {1 - value:.0%} of tumour slices on {where} (sensitivity {value:.3f})")
        else:
            lines.append(f"- calls {1 - value:.0%} of tumour-free slices a tumour on {where} "
                         f"(specificity {value:.3f})")
    return lines


def _guard_held_out(docs: ModelDocs) -> dict[str, Any]:
    trust = (docs.report or {}).get("trust") or {}
    return ((trust.get("ood") or {}).get("real_held_out")
            or (docs.meta.get("ood") or {}).get("held_out") or {})


def guard_weak_spots(docs: ModelDocs, below: float = 0.9) -> list[str]:
    """Held-out image kinds the guard refuses less than `below` of, in plain words."""
    categories = _guard_held_out(docs).get("categories") or {}
    weak = sorted((entry.get("rate", 1.0), name) for name, entry in categories.items()
                  if entry.get("rate") is not None and entry["rate"] < below)
    return [f"- {name.replace('_', ' ')}: only {rate:.0%} refused by a guard that never saw that kind"
            for rate, name in weak]


# ---------------------------------------------------------------------------------------------
# The card


def _details(docs: ModelDocs) -> list[str]:
    meta = docs.meta
    training = meta.get("training") or {}
    inp = meta.get("input") or {}
    rows = [
        ["name, version", f"`{docs.name}` {meta.get('version', '')}"],
        ["served by default", "yes" if docs.default else "no (pick it with `model=" + docs.name + "`)"],
        ["architecture", _num(meta.get("architecture") or meta.get("arch"))],
        ["parameters", _num(meta.get("parameters"))],
        ["initial weights", _num(meta.get("weights"))],
        ["input", f"{inp.get('size')}×{inp.get('size')}, {inp.get('channels')} channel(s), "
                  f"{inp.get('dtype')} in {_num(inp.get('range'))}"],
        ["preprocessing", f"`{(meta.get('preprocessing') or {}).get('function')}` version "
                          f"{(meta.get('preprocessing') or {}).get('version')}"],
        ["classes (output order)", ", ".join(meta.get("classes") or [])],
        ["file", f"`{docs.path.as_posix()}` (sha256 `{str(meta.get('sha256'))[:16]}…`)"],
        ["trained on", ", ".join(training.get("collections") or []) or _num(training.get("data"))],
        ["report", f"`{docs.report_path.as_posix()}`" if docs.report_path else "none found in `reports/`"],
    ]
    return ["## Model details", ""] + _table(["", ""], rows)


def _uses() -> list[str]:
    return [
        "## Uses", "",
        "### Intended use", "",
        "Research and teaching: to show how a small network classifies a single 2D brain MRI "
        "slice as glioma, meningioma, pituitary tumour or no tumour, how confident it is, where "
        "it looked (Grad-CAM) and when it should not be trusted (the uncertain flag and the input "
        "guard). Primary users: students, researchers and engineers studying medical-image "
        "classification and its failure modes.", "",
        "### Out-of-scope use", "",
        "- Any diagnosis, triage, screening or treatment decision. "
        f"{DISCLAIMER}",
        "- Whole studies or 3D volumes judged by one slice; other organs; CT, X-ray or any modality "
        "but MRI (the guard refuses what it recognises as such, not everything).",
        "- Tumour types outside the four classes (metastases, lymphoma, paediatric tumours ...): "
        "the model has no way to say \"something else\".",
        "- Slices that are rotated, heavily cropped or annotated, or sequences it was not evaluated "
        "on below: figures do not transfer.", "",
    ]


def _training_data(docs: ModelDocs) -> list[str]:
    training = docs.meta.get("training") or {}
    lines = ["## Training data", ""]
    for collection in training.get("collections") or []:
        text = PROVENANCE.get(collection, "")
        lines.append(f"- **{collection}**: {text} More in `../shared/data/{collection}/README.md`.")
    lines.append("")
    per_collection = training.get("split_counts_by_collection") or {}
    rows = []
    for collection, splits in per_collection.items():
        for split, counts in splits.items():
            if isinstance(counts, dict):
                rows.append([collection, split, _num(sum(counts.values())),
                             ", ".join(f"{k} {v:,}" for k, v in counts.items())])
    if rows:
        lines += ["Images per split (the split manifest sits beside the model file):", ""]
        lines += _table(["collection", "split", "images", "by class"], rows)
    for key, label in (("grouping", "Splits keep near-duplicate groups and patients together"),
                       ("sampling", "Sampling")):
        if training.get(key):
            lines += [f"{label}: {training[key]}.", ""]
    return lines


def _evaluation_data(docs: ModelDocs) -> list[str]:
    rows = [[set_label(k), _num(v.get("images")), _num(v.get("description", ""))]
            for k, v in _sets(docs).items() if isinstance(v, dict)]
    return ["## Evaluation data", "",
            "Every set is scored on images the model never trained on, split per collection "
            "(whole patients, or whole near-duplicate groups). Validation was used for early "
            "stopping and calibration, so its figures are optimistic.", ""] + \
        _table(["set", "images", "what"], rows)


def _results(docs: ModelDocs) -> list[str]:
    sets = _sets(docs)
    lines = ["## Results", "", "### By collection and set", ""]
    rows = []
    for key, entry in sets.items():
        if isinstance(entry, dict):
            rows.append([set_label(key), _num(entry.get("images")), _num(entry.get("accuracy")),
                         _num(entry.get("macro_f1")), _num(_sensitivity(entry)),
                         _num(_specificity(entry)), _num(entry.get("ece"))])
    lines += _table(["set", "images", "accuracy", "macro F1", "any-tumour sensitivity",
                     "specificity", "ECE (calibrated)"], rows)
    lines += ["### By MRI sequence (held-out sets)", ""] + figures_table(docs)
    per_class = [(key, entry["per_class"]) for key, entry in sets.items()
                 if isinstance(entry, dict) and entry.get("per_class")]
    if per_class:
        lines += ["### By class (recall / AUC)", ""]
        classes = docs.meta.get("classes") or list(per_class[0][1])
        rows = [[set_label(key)] + [f"{_num(pc.get(c, {}).get('recall'))} / {_num(pc.get(c, {}).get('auc'))}"
                                    if pc.get(c, {}).get("support") else "no images" for c in classes]
                for key, pc in per_class]
        lines += _table(["set"] + list(classes), rows)
    pointing = (docs.report or {}).get("pointing") or docs.meta.get("pointing") or {}
    if pointing:
        lines += ["### Grad-CAM pointing", ""]
        for key, entry in pointing.items():
            sequences = ", ".join(f"{_sequence(s)} {_num(v)}" for s, v in (entry.get("by_sequence") or {}).items())
            lines += [f"{set_label(key)}: **{_num(entry.get('pointing'))}** of {_num(entry.get('slices'))} tumour "
                      f"slices ({sequences}). Rule: {entry.get('rule', '')}.", ""]
    if docs.comparison:
        comparison = docs.comparison
        lines += ["### Beside the other served models", "",
                  f"`reports/compare.json`: worst off-collection figure "
                  f"{_num((comparison.get('held_out_score') or [None])[0])} (the default-model rule, "
                  f"`registry.held_out_score`), single-image forward pass "
                  f"{_num(comparison.get('latency_ms'), 1)} ms, file {_num(comparison.get('file_mb'), 2)} MB.", ""]
    for key, value in (docs.report or {}).items():
        if key not in KNOWN_REPORT_KEYS:
            lines += [f"### {_title(key)}", ""] + generic(value, 4)
    return lines


def _calibration(docs: ModelDocs) -> list[str]:
    trust = (docs.report or {}).get("trust") or {}
    calibration = docs.meta.get("calibration") or {}
    temperature = trust.get("temperature", calibration.get("temperature"))
    threshold = trust.get("uncertain_below", calibration.get("uncertain_below"))
    lines = ["## Calibration and the uncertain flag", "",
             f"Temperature scaling fitted on {calibration.get('fitted_on', 'validation')} "
             f"(T = {_num(temperature)}). An answer whose top class is below "
             f"**{_num(threshold)}** is flagged \"uncertain\" on the page, in the API and in the CLI; "
             f"the threshold is the lowest at which unflagged validation answers reach "
             f"{_pct(calibration.get('target_accuracy'))} accuracy.", ""]
    rows = []
    for key, entry in (trust.get("calibration") or {}).items():
        rows.append([set_label(key), _num(entry.get("images")), f"{_num(entry.get('ece_before'))} → "
                     f"{_num(entry.get('ece_after'))}", _pct(entry.get("uncertain_rate")),
                     _pct(entry.get("accuracy_confident")), _pct(entry.get("accuracy_uncertain"))])
    lines += _table(["set", "images", "ECE before → after", "flagged uncertain",
                     "accuracy when not flagged", "accuracy when flagged"], rows)
    return lines


def _guard(docs: ModelDocs, recipe: bool = True) -> list[str]:
    trust = (docs.report or {}).get("trust") or {}
    held = _guard_held_out(docs)
    lines = ["## The input guard", "",
             "Before a class is given, the upload must look like a brain MRI slice (cheap checks "
             "plus the guard network, `model/guard/`); otherwise it is refused with a reason and no "
             "class.", ""]
    if recipe:
        lines += guard_recipe(docs)
    categories = held.get("categories") or {}
    if categories:
        lines += [f"**Image kinds it never saw** (leave-one-category-out on `ood_train/`): "
                  f"{_pct(held.get('overall'))} of {_num(held.get('images'))} real non-brain "
                  f"images refused.", ""]
        lines += _table(["kind", "images", "refused", "share"],
                        [[name.replace("_", " "), _num(e.get("images")), _num(e.get("refused")), _pct(e.get("rate"))]
                         for name, e in sorted(categories.items())])
    refusals = trust.get("false_refusal") or {}
    if refusals:
        rows = []
        for key, entry in refusals.items():
            clean = entry.get("not_almost_black") or entry.get("mri_only") or {}
            rows.append([set_label(key), f"{_num(entry.get('refused'))}/{_num(entry.get('images'))} = {_pct(entry.get('rate'))}",
                         f"{_num(clean.get('refused'))}/{_num(clean.get('images'))} = {_pct(clean.get('rate'))}"
                         if clean else "same"])
        lines += ["**Brain MRI refused by mistake** (target ≤ 1 %; the second column sets apart "
                  "almost-black end-of-volume files and head CT filed as MRI):", ""]
        lines += _table(["set", "whole set", "brain MRI with anatomy in view"], rows)
    ood = trust.get("ood") or {}
    if ood.get("categories"):
        rows = [[name.replace("_", " "), e.get("expect", ""), _num(e.get("images")), _pct(e.get("refusal_rate"))]
                for name, e in ood["categories"].items()]
        lines += ["**Synthetic and transformed images** (built at run time, `training/ood_sets.py`): "
                  f"{_pct(ood.get('refusal_rate_expected_refuse'))} of those that should be refused are, "
                  f"{_pct(ood.get('refusal_rate_expected_pass'))} of those that should pass are not.", ""]
        lines += _table(["kind", "expected", "images", "refused"], rows)
    for key, value in trust.items():
        if key not in KNOWN_TRUST_KEYS:
            lines += [f"### {_title(key)}", ""] + generic(value, 4)
    return lines


def guard_recipe(docs: ModelDocs) -> list[str]:
    """What the linked guard network is and what it was trained on, from its own JSON."""
    guard = docs.extra.get("guard")
    if not guard:
        return []
    config = guard.get("config") or {}
    embedding = guard.get("embedding") or {}
    negatives = guard.get("negatives") or {}
    real = {k: v for k, v in negatives.items() if not k.startswith("exposure_")}
    made = {k.removeprefix("exposure_"): v for k, v in negatives.items() if k.startswith("exposure_")}
    positives = guard.get("positives") or {}
    lines = [f"The guard network (`{docs.extra['guard_path'].as_posix()}`, sha256 "
             f"`{str(guard.get('sha256'))[:16]}…`): {guard.get('network', 'n/a')} on a "
             f"{guard.get('side')}-px copy of the model input; a second, one-class score is the "
             f"distance of its {_num(embedding.get('dims'))} features to the nearest of "
             f"{_num(embedding.get('prototypes'))} brain prototypes. "
             f"Both bounds sit at the {_pct(config.get('tail'))} validation tail, widened until "
             f"cross-fitted false refusals stay under {_pct(config.get('max_logit_refusal'))}.", "",
             f"Trained by `{guard.get('command', 'n/a')}` on "
             f"brain slices of {', '.join(f'{k} ({v:,})' for k, v in positives.items())}, against "
             f"{sum(real.values()):,} real images of {len(real)} kinds that are not brain MRI and "
             f"images made from training slices: {', '.join(f'{k.replace(chr(95), chr(32))} ({v:,})' for k, v in made.items())}.", ""]
    held = guard.get("held_out") or {}
    collections = held.get("collections") or {}
    if collections:
        lines += ["**A brain collection left out** (the guard refitted without it, asked about its "
                  "validation slices): " + "; ".join(
                      f"without {name}, {_pct(entry.get('falsely_refused'))} of its {_num(entry.get('images'))} "
                      f"slices refused" + (f" ({_pct(entry['reformats'].get('falsely_refused'))} of its "
                                           f"sagittal/coronal reformats)" if entry.get("reformats") else "")
                      for name, entry in collections.items()) + ".", ""]
    sources = held.get("sources") or {}
    worst = []
    for category, by_source in sorted(sources.items()):
        rated = [(e.get("rate"), name, e.get("images")) for name, e in by_source.items()
                 if isinstance(e, dict) and e.get("rate") is not None]
        if len(rated) > 1:
            rate, name, images = min(rated)
            if rate < 0.9:
                worst.append([category.replace("_", " "), f"`{name.rsplit('/', 1)[-1]}`", _num(images), _pct(rate)])
    if worst:
        lines += ["**A new source of a kind it knows** (the guard refitted without that source "
                  "alone): the worst source of each kind under 90 %:", ""]
        lines += _table(["kind", "source", "images", "refused"], worst)
    return lines


def _limitations(docs: ModelDocs) -> list[str]:
    lines = ["## Bias, risks and limitations", "",
             "Measured weak spots (lowest held-out figures in this model's report):", ""]
    lines += weakest(docs, 4) + [""]
    weak_guard = guard_weak_spots(docs)
    if weak_guard:
        lines += ["Kinds of image the guard lets through most often:", ""] + weak_guard + [""]
    lines += [
        "Known by construction:", "",
        "- One slice at a time: no neighbouring slices, no other sequences of the same patient, "
        "no clinical context.",
        "- SARTAJ's classes are confounded with their source collections, and its `no_tumor` "
        "class contains head CT slices (`brainmri/training/audits/`); LGG and BraTS hold only "
        "glioma and no-tumour slices, so meningioma and pituitary are learnt from one collection.",
        "- The guard treats \"upright\" as part of a brain slice: rotated uploads are refused "
        "rather than classified.",
        "- Figures on a collection the model trained on (held-out patients) overstate what a new "
        "hospital's scans would get.", "",
    ]
    return lines


def _procedure(docs: ModelDocs) -> list[str]:
    training = docs.meta.get("training") or {}
    config = training.get("config") or {}
    minutes = training.get("wall_seconds")
    lines = ["## Training procedure", "",
             f"```sh\n{training.get('command', 'n/a')}\n```", "",
             f"Wall time {_num(minutes / 60 if minutes else None, 1)} min on {training.get('machine', 'n/a')} "
             f"(Keras {training.get('keras', 'n/a')}); {_num(training.get('epochs_run'))} epochs, best "
             f"epoch {_num(training.get('best_epoch'))}"
             f"{', stopped by the time limit' if training.get('stopped_for_time') else ''}. "
             "Then `brainmri calibrate` and `brainmri evaluate --write-metadata` (see "
             "[Models and evaluation](../models.md)).", ""]
    if config:
        lines += _table(["setting", "value"],
                        [[k, _num(v) if isinstance(v, (bool, list)) else str(v)] for k, v in config.items()])
    return lines


def render_card(docs: ModelDocs) -> str:
    """The Markdown model card of one model."""
    collections = (docs.meta.get("training") or {}).get("collections") or []
    # Hugging Face's card metadata (YAML front matter; MkDocs reads it as page meta).
    lines = ["---", "pipeline_tag: image-classification", "library_name: keras",
             "tags: [medical-imaging, brain-mri, research-only, not-for-diagnosis]",
             f"datasets: [{', '.join(collections)}]",
             "metrics: [accuracy, f1, sensitivity, specificity, ece]", "---", "",
             f"# Model card: {docs.name}", "",
             f"<!-- Generated by `{GENERATOR_COMMAND}` from `{docs.path.with_suffix('.json').as_posix()}`"
             f"{' and `' + docs.report_path.as_posix() + '`' if docs.report_path else ''}; do not edit. -->", "",
             f"!!! warning \"Research and education only\"\n    {DISCLAIMER}", ""]
    if docs.report_note:
        lines += [f"!!! note \"Stale report\"\n    {docs.report_note}", ""]
    for part in (_details, lambda d: _uses(), _training_data, _evaluation_data, _results,
                 _calibration, _guard, _limitations, _procedure):
        try:
            lines += part(docs)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            # A report of a shape this module does not know yet: say so, show the raw values,
            # and let the rest of the card be written.
            title, raw = _FALLBACK.get(getattr(part, "__name__", ""), ("Section", None))
            value = raw(docs) if raw else None
            lines += [f"## {title}", "", f"!!! note \"Laid out generically\"\n    This part of the "
                      f"report has a shape the generator does not know ({type(exc).__name__}: {exc}); "
                      "its values follow as they are.", ""]
            lines += generic(value, 3) if value is not None else []
    lines += ["## References", "",
              "Mitchell et al., \"Model Cards for Model Reporting\", FAT* 2019 (arXiv:1810.03993).", ""]
    return _tidy(lines)


_FALLBACK = {
    "_details": ("Model details", lambda d: {k: v for k, v in d.meta.items() if not isinstance(v, (dict, list))}),
    "_training_data": ("Training data", lambda d: (d.meta.get("training") or {}).get("split_counts_by_collection")),
    "_evaluation_data": ("Evaluation data", lambda d: None),
    "_results": ("Results", lambda d: _sets(d)),
    "_calibration": ("Calibration and the uncertain flag",
                     lambda d: ((d.report or {}).get("trust") or {}).get("calibration") or d.meta.get("calibration")),
    "_guard": ("The input guard", lambda d: {k: v for k, v in ((d.report or {}).get("trust") or {}).items()
                                             if k in ("false_refusal", "ood")}),
    "_limitations": ("Bias, risks and limitations", lambda d: None),
    "_procedure": ("Training procedure", lambda d: (d.meta.get("training") or {}).get("config")),
}


def _tidy(lines: list[str]) -> str:
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.rstrip("\n") + "\n"


# ---------------------------------------------------------------------------------------------
# Blocks in the README and pages


def _index(models: list[ModelDocs]) -> str:
    lines = ["# Model cards", "",
             f"<!-- Generated by `{GENERATOR_COMMAND}`; do not edit. -->", "",
             "One card per model in `model/`, generated from its metadata and `reports/`.", ""]
    rows = []
    for docs in models:
        rows.append([f"[{docs.name}]({docs.name}.md)" + (" (default)" if docs.default else ""),
                     _num(docs.meta.get("version")), _num(docs.meta.get("architecture") or docs.meta.get("arch")),
                     ", ".join((docs.meta.get("training") or {}).get("collections") or [])])
    lines += _table(["model", "version", "architecture", "trained on"], rows)
    return _tidy(lines)


def blocks(models: list[ModelDocs], link_prefix: str) -> dict[str, str]:
    """The generated blocks by key; `link_prefix` is the path from the page to `docs/`."""
    default = next((docs for docs in models if docs.default), None)
    if default is None:
        return {}
    card = f"{link_prefix}models/{default.name}.md"
    figures = [f"The default model, [`{default.name}`]({card}) v{default.meta.get('version', '')}, "
               f"on images it never trained on (from `{default.report_path.as_posix() if default.report_path else 'its metadata'}`):", ""]
    figures += figures_table(default)
    held = {key for key, _, _ in held_out_rows(default)}
    calibration = ((default.report or {}).get("trust") or {}).get("calibration") or {}
    flagged = [f"{set_label(key)} {_pct(entry.get('uncertain_rate'))} (the rest "
               f"{_pct(entry.get('accuracy_confident'))} right)"
               for key, entry in calibration.items() if key in held]
    if flagged:
        figures += ["Flagged uncertain: " + "; ".join(flagged) + ".", ""]
    figures += ["Where it is weakest:", ""] + weakest(default) + guard_weak_spots(default)[:3] + [""]
    others = [docs for docs in models if not docs.default]
    models_lines = _table(["model", "card", "report"],
                          [[f"`{d.name}`" + (" (default)" if d.default else ""), f"[card]({link_prefix}models/{d.name}.md)",
                            f"`{d.report_path.as_posix()}`" if d.report_path else "none"] for d in [default, *others]])
    guard = _guard(default, recipe=False)[2:]
    return {"default-figures": _tidy(figures), "models": _tidy(models_lines), "guard-figures": _tidy(guard),
            "guard-recipe": _tidy(guard_recipe(default) or ["No guard network is linked."])}


def _fill(text: str, generated: dict[str, str]) -> str:
    def replace(match: re.Match) -> str:
        body = generated.get(match.group("key"))
        if body is None:
            return match.group(0)
        return match.group(1) + body + match.group(4)
    return _BLOCK.sub(replace, text)


def _fill_yaml(text: str, models: list[ModelDocs]) -> str:
    def replace(match: re.Match) -> str:
        if match.group("key") != "model-cards":
            return match.group(0)
        indent = match.group("indent")
        body = "".join(f"{indent}- {docs.name}: models/{docs.name}.md\n" for docs in models)
        return indent + match.group(2) + body + indent + match.group(5)
    return _YAML_BLOCK.sub(replace, text)


def other_reports(root: Path, models: list[ModelDocs]) -> list[ModelDocs]:
    """Reports in `reports/` that no served model's card quotes: earlier models kept as baselines,
    leave-one-out runs, models that were not shipped."""
    quoted = {docs.report_path for docs in models if docs.report_path}
    others = []
    for path in sorted((root / "reports").rglob("metrics.json")):
        relative = path.relative_to(root)
        data = _read_json(path)
        if relative in quoted or not data:
            continue
        model = data.get("model") or {}
        others.append(ModelDocs(name=str(model.get("name", path.parent.name)), path=relative,
                                meta={"version": model.get("version")}, report=data, report_path=relative))
    return others


def _other_reports_block(others: list[ModelDocs]) -> str:
    if not others:
        return "No other reports in `reports/`.\n"
    lines: list[str] = []
    for docs in others:
        trained = ", ".join(_trained_on(docs)) or "n/a"
        lines += [f"**`{docs.report_path.as_posix()}`**: `{docs.name}` {docs.meta.get('version') or ''}, "
                  f"trained on {trained}.", ""]
        lines += figures_table(docs)
        for key, value in (docs.report or {}).items():
            if key not in KNOWN_REPORT_KEYS:
                lines += [f"*{_title(key)}*", ""] + generic(value, 4)
    return _tidy(lines)


def render_all(root: Path) -> dict[Path, str]:
    """Every generated file (relative path -> text): the cards, their index, the marked blocks."""
    models = load_models(root)
    others = _other_reports_block(other_reports(root, models))
    out: dict[Path, str] = {CARDS_DIR / "index.md": _index(models)}
    for docs in models:
        out[docs.card_path] = render_card(docs)
    for name in BLOCK_FILES:
        path = root / name
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            if name.endswith(".yml"):
                out[Path(name)] = _fill_yaml(text, models)
                continue
            prefix = "docs/" if name == "README.md" else ""
            out[Path(name)] = _fill(text, {**blocks(models, prefix), "other-reports": others})
    return out


def stale_files(root: Path) -> list[Path]:
    """Generated files whose committed text differs from what the generator writes, and cards of
    models no longer in `model/`."""
    expected = render_all(root)
    stale = [path for path, text in expected.items()
             if not (root / path).is_file() or (root / path).read_text(encoding="utf-8") != text]
    cards = root / CARDS_DIR
    if cards.is_dir():
        stale += [p.relative_to(root) for p in sorted(cards.glob("*.md")) if p.relative_to(root) not in expected]
    return stale


def write_all(root: Path) -> list[Path]:
    """Write every generated file that changed, remove cards of models gone; returns those paths."""
    expected = render_all(root)
    changed = stale_files(root)
    for path in changed:
        target = root / path
        if path in expected:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(expected[path], encoding="utf-8")
        else:
            target.unlink()
    return changed
