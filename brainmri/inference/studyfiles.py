"""Studies from files on disk, for `brainmri predict`: a volume's slice rows and `--by-study`.

The same reading and screening as POST /api/v1/studies (`imaging.read_study`, `screen_study`):
a NIfTI volume gives one row per axial slice with its index; with `--by-study` each volume, each
ZIP and the slice files of each folder (a DICOM series, or slices ordered by name) are one study,
one summary row each. Paths appear in the CSV because the user named them; nothing is logged.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from ..imaging import ImageError
from ..imaging import StudyLimits
from ..imaging import read_study
from .guarded import csv_row
from .modelcard import CLASSES
from .study import DEFAULT_RULE
from .study import StudyResult
from .study import screen_study

__all__ = ["STUDY_SUMMARY_COLUMNS", "VolumeRows", "predict_by_study", "screen_files"]

STUDY_SUMMARY_COLUMNS = ["study", "kind", "slices", "scored", "blank", "refused", "uncertain",
                         "unreadable", "label", "tumor_probability", "most_suspicious", "rule",
                         "error"]
_SLICE_FILES = (".png", ".jpg", ".jpeg", ".dcm")


def _is_volume(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def screen_files(paths: Sequence[Path], predictor, threshold: float, guard: bool = True,
                 limits: StudyLimits = StudyLimits()) -> StudyResult:
    """Read files from disk as one study and screen it as the API does.

    Raises:
        ImageError: the study as a whole was refused (limits, mixed series, bad archive).
        OSError: a file could not be read.
    """
    study = read_study([(path.name, path.read_bytes()) for path in paths],
                       predictor.input_size, limits)
    return screen_study(predictor, study, threshold, guard=guard)


class VolumeRows:
    """A csv.writer for `brainmri predict` that adds the `slice` column and writes volumes."""

    def __init__(self, writer) -> None:
        self._writer = writer

    def writerow(self, row: list[str]) -> None:
        """A header gets `slice`; a file's row an empty slice."""
        self._writer.writerow([*row, "slice" if row and row[0] == "path" else ""])

    def write_volume(self, path: Path, predictor, threshold: float, guard: bool,
                     counts: Counter) -> None:
        """One row per axial slice of a NIfTI volume (or one error row if it cannot be read)."""
        no_class = [""] * (len(CLASSES) + 3)
        try:
            result = screen_files([path], predictor, threshold, guard)
        except (ImageError, OSError) as error:
            message = getattr(error, "message", f"The file could not be read ({type(error).__name__}).")
            self._writer.writerow([str(path), *no_class, message, "false", "", "", ""])
            counts["unreadable"] += 1
            return
        for item in result.slices:
            if item.blank:
                row = [str(path), *no_class, "", "false", item.reason, ""]
                counts["blank"] += 1
            else:
                row = csv_row(path, item.outcome)
                if item.scored:
                    counts["classified"] += 1
                    counts["uncertain"] += int(item.uncertain)
                else:
                    counts["refused" if item.refused else "unreadable"] += 1
            self._writer.writerow([*row, str(item.index)])


def _studies(paths: Sequence[Path]) -> list[tuple[Path, list[Path]]]:
    """Each study named on the command line or found in folders: (name, its files)."""
    studies: list[tuple[Path, list[Path]]] = []
    for path in paths:
        if path.is_file():
            studies.append((path, [path]))
            continue
        folders: dict[Path, list[Path]] = {}
        for child in sorted(path.rglob("*")):
            if not child.is_file():
                continue
            name = child.name.lower()
            if _is_volume(child) or name.endswith(".zip"):
                studies.append((child, [child]))
            elif name.endswith(_SLICE_FILES):
                folders.setdefault(child.parent, []).append(child)
        studies.extend(folders.items())
    return studies


def predict_by_study(paths: Sequence[Path], predictor, csv_path: Path, threshold: float,
                     guard: bool = True) -> int:
    """Write one summary row per study to `csv_path`; return how many studies were written."""
    written = 0
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(STUDY_SUMMARY_COLUMNS)
        for name, files in _studies(paths):
            try:
                result = screen_files(files, predictor, threshold, guard)
            except (ImageError, OSError) as error:
                message = getattr(error, "message",
                                  f"The files could not be read ({type(error).__name__}).")
                writer.writerow([str(name), "", len(files), *[""] * 9, message])
            else:
                s = result.summary
                writer.writerow([str(name), result.kind, s.slices, s.scored, s.blank, s.refused,
                                 s.uncertain, s.unreadable, s.label,
                                 "" if s.tumor_probability is None else f"{s.tumor_probability:.6f}",
                                 " ".join(map(str, s.most_suspicious)), DEFAULT_RULE.description,
                                 ""])
            written += 1
            handle.flush()
    return written
