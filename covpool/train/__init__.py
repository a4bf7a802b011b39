"""Training tools on top of covpool: configs, data, the training loop, evaluation and checkpoints.

``covpool train --config <name or file> [key=value ...]``, ``covpool eval`` and ``covpool predict`` are thin
wrappers over :func:`train`, :func:`evaluate` and :func:`predict`; :func:`load_model` rebuilds a trained model
from its checkpoint alone (also ``covpool.load_model``), :func:`build_model` a model from a config's model
section, and :class:`Checkpoint` reads a checkpoint once, verified. Importing this package loads only
covpool's own modules on top of ``import covpool`` (which loads torch, torchvision and timm, and with timm
PyYAML and tqdm); matplotlib loads when a run draws its curves, scikit-image when the embedded data set is built.
"""
from ._dist import DistributedFailure
from ._model import PretrainedWeightsError, build_model
from ._run_folder import RunExistsError, RunLockedError
from ._stop import TrainingAborted
from .checkpoint import Checkpoint, CheckpointError, atomic_save, load_checkpoint
from .config import ConfigError, DataConfig, ModelConfig, OptimConfig, TrainConfig, load_config
from .config_checks import check_config
from .data import CUB200, ClassListError, DatasetNotFoundError, build_datasets, dataset_names, open_datasets
from .embedded import EmbeddedTextures
from .engine import NonFiniteLossError, TrainResult, train
from .evaluation import EvalResult, evaluate
from .inference import ImageReadError, Prediction, load_model, predict

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
    "EvalResult",
    "load_model",
    "predict",
    "Prediction",
    "ImageReadError",
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
    "open_datasets",
    "dataset_names",
    "DatasetNotFoundError",
    "ClassListError",
    "PretrainedWeightsError",
    "EmbeddedTextures",
    "CUB200",
    "atomic_save",
    "load_checkpoint",
]
