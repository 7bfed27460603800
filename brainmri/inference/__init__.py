"""The served models: metadata, predictor, guard, calibration, Grad-CAM, and the guarded path.

Imports only `imaging` below it; no Flask. TensorFlow is imported when a model loads, never at
import time. `classify_many`/`classify_one` (guarded.py) are the path the page, the API and
`brainmri predict` all take. `export` and `raybatch` (the optional extras, listed in __all__)
are not imported here but on first use (``from brainmri.inference import export``).
"""

from . import calibration
from . import explain
from . import guardnet
from . import ood
from . import onnxengine
from . import uncertainty
from .explain import heatmap_png
from .explain import legend_data_uri
from .explain import overlay_data_uri
from .guarded import PREDICT_COLUMNS
from .guarded import REFUSAL_CODES
from .guarded import Outcome
from .guarded import classify_many
from .guarded import classify_one
from .guarded import classify_prepared
from .guarded import csv_row
from .guarded import is_refusal
from .guarded import uncertain_threshold
from .modelcard import CLASSES
from .modelcard import TRAIN_HINT
from .modelcard import ModelCard
from .modelcard import ModelError
from .modelcard import file_sha256
from .modelcard import metadata_path_for
from .modelcard import read_model_card
from .modelcard import write_model_card
from .ood import NotBrainMRI
from .ood import OODGuard
from .ood import Verdict
from .predictor import DISCLAIMER
from .predictor import ENGINES
from .predictor import Explanation
from .predictor import Prediction
from .predictor import Predictor
from .predictor import engine_choice
from .registry import ModelRegistry
from .registry import UnknownModel
from .registry import default_model_path
from .registry import discover_models
from .registry import held_out_score
from .registry import leakage_free_score
from .uncertainty import UncertaintyRule
from .uncertainty import fit_feature_space
from .study import DEFAULT_RULE
from .study import STUDY_COLUMNS
from .study import SliceResult
from .study import StudyResult
from .study import StudyRule
from .study import screen_study
from .study import slice_csv_row
from .studyfiles import VolumeRows
from .studyfiles import predict_by_study

__all__ = [
    "CLASSES",
    "DEFAULT_RULE",
    "DISCLAIMER",
    "ENGINES",
    "PREDICT_COLUMNS",
    "REFUSAL_CODES",
    "STUDY_COLUMNS",
    "TRAIN_HINT",
    "Explanation",
    "ModelCard",
    "ModelError",
    "ModelRegistry",
    "NotBrainMRI",
    "OODGuard",
    "Outcome",
    "Prediction",
    "SliceResult",
    "StudyResult",
    "StudyRule",
    "Predictor",
    "UncertaintyRule",
    "UnknownModel",
    "VolumeRows",
    "Verdict",
    "calibration",
    "classify_many",
    "classify_one",
    "classify_prepared",
    "csv_row",
    "default_model_path",
    "discover_models",
    "engine_choice",
    "explain",
    "fit_feature_space",
    "export",
    "file_sha256",
    "heatmap_png",
    "held_out_score",
    "is_refusal",
    "leakage_free_score",
    "legend_data_uri",
    "metadata_path_for",
    "guardnet",
    "ood",
    "onnxengine",
    "overlay_data_uri",
    "predict_by_study",
    "raybatch",
    "read_model_card",
    "screen_study",
    "slice_csv_row",
    "uncertain_threshold",
    "uncertainty",
    "write_model_card",
]
