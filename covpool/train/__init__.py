"""Training tools on top of covpool: configs, data, the training loop, evaluation and checkpoints.

``covpool train --config <name or file> [key=value ...]`` and ``covpool eval`` are thin wrappers over
:func:`train` and :func:`evaluate`. Importing this package loads only covpool's own modules on top of
``import covpool`` (which loads torch, torchvision and timm, and with timm PyYAML and tqdm); matplotlib loads
when a run draws its curves, scikit-image when the embedded data set is built.
"""
from ._dist import DistributedFailure
from ._model import build_model
from ._run_folder import RunExistsError, RunLockedError
from ._stop import TrainingAborted
from .checkpoint import Checkpoint, CheckpointError, atomic_save, load_checkpoint
from .config import ConfigError, DataConfig, ModelConfig, OptimConfig, TrainConfig, load_config
from .data import CUB200, DatasetNotFoundError, build_datasets, dataset_names
from .embedded import EmbeddedTextures
from .engine import NonFiniteLossError, TrainResult, train
from .evaluation import evaluate
from .validate import check_config

__all__ = [
    "TrainConfig",
    "ModelConfig",
    "DataConfig",
    "OptimConfig",
    "ConfigError",
    "load_config",
    "check_config",
    "train",
    "evaluate",
    "TrainResult",
    "NonFiniteLossError",
    "RunExistsError",
    "RunLockedError",
    "TrainingAborted",
    "DistributedFailure",
    "Checkpoint",
    "CheckpointError",
    "build_model",
    "build_datasets",
    "dataset_names",
    "DatasetNotFoundError",
    "EmbeddedTextures",
    "CUB200",
    "atomic_save",
    "load_checkpoint",
]
