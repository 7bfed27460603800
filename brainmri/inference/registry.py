"""Every trained model in the model folder, served side by side, and which one is the default.

A model is a ``<name>.h5`` with its ``<name>.json`` metadata (written by `brainmri train`).
The default is BRAINMRI_DEFAULT_MODEL when set, else the model with the best `held_out_score`
recorded by `brainmri evaluate --write-metadata`, so adding a better model to the folder makes
it the default without a code change.

The rule, written down before the retrained models' figures were in (issue 13): a model is
ranked by its **worst off-collection figure**, the minimum over
- any-tumour sensitivity and specificity in every MRI sequence of every patient-split
  collection's held-out patients (`<collection>/test`, e.g. `lgg/test` in T1, T1c and FLAIR), and
- accuracy on official Testing images with no near-copy in training
  (`<collection>/official_test_novel`),
because a clinician meets scans from other collections, and the worst sequence is what fails
them. The mean accuracy over the in-collection test splits breaks ties. A model whose metadata
carries none of these (version-1 metadata) ranks below every model that does.

Discovery reads only the JSON files (no TensorFlow), so the CLI can use `default_model_path`
and the gunicorn master stays light; `ModelRegistry` then validates every model's sha256 and
fails the whole app on any bad one, rather than serving a half-working list.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from .modelcard import ModelError
from .modelcard import metadata_path_for

__all__ = [
    "ModelRegistry",
    "UnknownModel",
    "default_model_path",
    "discover_models",
    "held_out_score",
    "leakage_free_score",
]


class UnknownModel(LookupError):
    """A request named a model this server does not have (HTTP 400 `unknown_model`)."""

    code = "unknown_model"
    status = 400

    def __init__(self, name: str, known: list[str]) -> None:
        self.message = f"There is no model called {name!r}; choose one of {', '.join(known)}."
        super().__init__(self.message)


def discover_models(model_dir: Path) -> list[Path]:
    """The ``.h5`` models in `model_dir` (training checkpoints ``*.weights.h5`` excluded), sorted.

    A model without its metadata file is included, so that loading it reports the missing JSON
    instead of the model silently disappearing from the list.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(path for path in model_dir.glob("*.h5") if not path.name.endswith(".weights.h5"))


def held_out_score(metadata: dict) -> tuple[float, float]:
    """(worst off-collection figure, mean in-collection test accuracy); see the module docstring."""
    evaluation = metadata.get("evaluation") or {}
    worst: list[float] = []
    tests: list[float] = []
    for name, entry in evaluation.items():
        if name.endswith("/official_test_novel") and entry.get("accuracy") is not None:
            worst.append(float(entry["accuracy"]))
        if name.endswith("/test"):
            if entry.get("accuracy") is not None:
                tests.append(float(entry["accuracy"]))
            for sequence in (entry.get("by_sequence") or {}).values():
                worst += [float(sequence[key]) for key in ("sensitivity", "specificity")
                          if sequence.get(key) is not None]
    if not worst:
        return -1.0, leakage_free_score(metadata)[0]
    return min(worst), (sum(tests) / len(tests) if tests else -1.0)


def leakage_free_score(metadata: dict) -> tuple[float, float]:
    """(accuracy, macro-F1) on a leakage-free test split from the metadata; (-1, -1) if absent.

    Version-1 metadata names it "test"; from version 2 the first "<collection>/test" counts.
    """
    evaluation = metadata.get("evaluation") or {}
    test = evaluation.get("test") or next(
        (entry for name, entry in evaluation.items() if name.endswith("/test")), {})
    return float(test.get("accuracy", -1.0)), float(test.get("macro_f1", -1.0))


def _read_metadata(model_path: Path) -> dict:
    try:
        return json.loads(metadata_path_for(model_path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _model_name(path: Path) -> str:
    return str(_read_metadata(path).get("name") or path.stem)


def _pick_default(paths: list[Path], preferred: str | None) -> Path:
    by_name = {_model_name(path): path for path in paths}
    if preferred:
        if preferred not in by_name:
            raise ModelError(
                f"BRAINMRI_DEFAULT_MODEL is {preferred!r}, but the model folder holds "
                f"{', '.join(by_name) or 'no models'}."
            )
        return by_name[preferred]
    # Best held-out figure first; the name breaks exact ties so the choice is stable.
    return max(paths, key=lambda path: (held_out_score(_read_metadata(path)),
                                        _model_name(path)))


def default_model_path(model_dir: Path, preferred: str | None = None) -> Path:
    """The default model's path in `model_dir` (see the module docstring), without loading it.

    Raises:
        ModelError: no model in the folder, or `preferred` names none of them.
    """
    paths = discover_models(model_dir)
    if not paths:
        from .modelcard import TRAIN_HINT

        raise ModelError(f"No trained model in {model_dir}. Train one with: {TRAIN_HINT}.")
    return _pick_default(paths, preferred)


class ModelRegistry:
    """The served predictors by model name, the default first."""

    def __init__(self, predictors: dict, default: str) -> None:
        if default not in predictors:
            raise ModelError(f"The default model {default!r} is not among the served models.")
        self.default = default
        # Default first, then by leakage-free test figures: the order the page lists them in.
        rest = sorted((name for name in predictors if name != default),
                      key=lambda name: held_out_score(predictors[name].card.raw), reverse=True)
        self._predictors = {name: predictors[name] for name in (default, *rest)}

    @classmethod
    def from_paths(cls, paths: list[Path], default: Path, max_pixels: int) -> ModelRegistry:
        """Validate every model's metadata and sha256 (no TensorFlow); unloaded predictors.

        Raises:
            ModelError: any model is missing its metadata or does not match it.
        """
        from .predictor import Predictor

        predictors = {}
        for path in paths:
            predictor = Predictor.from_path(path, max_pixels=max_pixels)
            name = predictor.card.name  # what responses report as model.name
            if name in predictors:
                raise ModelError(f"Two models in the folder are called {name!r} in their metadata.")
            predictors[name] = predictor
            if path == default:
                default_name = name
        return cls(predictors, default_name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._predictors)

    def __len__(self) -> int:
        return len(self._predictors)

    def __contains__(self, name: object) -> bool:
        return name in self._predictors

    @property
    def names(self) -> list[str]:
        """Model names, the default first."""
        return list(self._predictors)

    def get(self, name: str | None = None):
        """The predictor called `name`, or the default for None/empty.

        Raises:
            UnknownModel: no model has that name.
        """
        if not name:
            return self._predictors[self.default]
        try:
            return self._predictors[name]
        except KeyError:
            raise UnknownModel(name, self.names) from None

    @property
    def ready(self) -> bool:
        """True once every model is loaded and warmed up."""
        return all(predictor.ready for predictor in self._predictors.values())

    def load(self) -> None:
        """Load and warm up every model (the default first).

        Raises:
            ModelError: a file is not a loadable Keras model or disagrees with its metadata.
        """
        for predictor in self._predictors.values():
            predictor.load()
