"""Training tools on top of covpool: configs, data, the training loop and checkpoints.

``covpool train --config configs/<name>.yaml [key=value ...]`` and ``covpool eval`` are thin wrappers over
:func:`train` and :func:`evaluate`. Importing this package is cheap; timm and torchvision data sets load
when a run starts.
"""
from ._model import build_model
from .checkpoint import CheckpointError, atomic_save, load_checkpoint
from .config import ConfigError, DataConfig, ModelConfig, OptimConfig, TrainConfig, load_config
from .data import CUB200, DatasetNotFoundError, build_datasets, dataset_names
from .embedded import EmbeddedTextures
from .engine import (
                     DistributedFailure,
                     NonFiniteLossError,
                     RunExistsError,
                     RunLockedError,
                     TrainingAborted,
                     TrainResult,
                     evaluate,
                     train,
)

__all__ = [
    "TrainConfig",
    "ModelConfig",
    "DataConfig",
    "OptimConfig",
    "ConfigError",
    "load_config",
    "train",
    "evaluate",
    "TrainResult",
    "NonFiniteLossError",
    "RunExistsError",
    "RunLockedError",
    "TrainingAborted",
    "DistributedFailure",
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
