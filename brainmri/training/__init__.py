"""Offline work on data sets: collections, near-duplicates, splits, networks, training, evaluation.

Imports `inference` (model metadata, predictor, guard) and `imaging`; nothing imports it but the
CLI. TensorFlow, matplotlib and scikit-learn are imported inside the functions that use them.
"""

from . import architectures
from . import cards
from . import dataset
from . import dedup
from . import evaluation
from . import guard_training
from . import metrics
from . import ood_sets
from . import plots
from . import splits
from . import trust
from .architectures import ARCHITECTURES
from .architectures import Architecture
from .architectures import build
from .architectures import build_model
from .architectures import check_weights
from .architectures import get_architecture
from .comparison import ComparisonError
from .comparison import compare
from .comparison import markdown_table
from .dataset import CachedDataset
from .dataset import discover
from .dataset import load_dataset
from .dataset import load_datasets
from .dataset import no_head_in_view
from .evaluation import evaluate
from .trainer import TrainConfig
from .trainer import TrainResult
from .trainer import train
from .trust import calibrate
from .trust import evaluate_trust

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "CachedDataset",
    "ComparisonError",
    "TrainConfig",
    "TrainResult",
    "architectures",
    "build",
    "build_model",
    "cards",
    "calibrate",
    "check_weights",
    "compare",
    "dataset",
    "dedup",
    "discover",
    "evaluate",
    "evaluate_trust",
    "evaluation",
    "guard_training",
    "get_architecture",
    "load_dataset",
    "load_datasets",
    "markdown_table",
    "metrics",
    "no_head_in_view",
    "ood_sets",
    "plots",
    "splits",
    "train",
    "trust",
]
