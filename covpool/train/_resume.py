"""The resume policy: what a checkpoint holds, where a run stands (:class:`Progress`), and what may change.

A checkpoint stores the weights under timm's keys, the optimizer, scaler and RNG states, and the run's
:class:`Progress`. A resumed run takes the new config: the optimizer's hyper-parameters and the learning-rate
schedule are rebuilt from it at the resumed position; what cannot be honoured (the model's shape, the data
set, the optimizer's kind) is refused with a :class:`ConfigError` listing it.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .config import ConfigError, TrainConfig, config_diff, config_to_dict, format_config_diff

__all__ = ["Progress", "model_changes", "check_resume_config", "training_state", "restore_weights",
           "resume_progress", "describe_resume"]

_log = logging.getLogger(__name__)

# Keys that say what the weights are: a checkpoint fits only the model they describe. model.pretrained only
# says where the first weights came from (the checkpoint holds every weight); a backend schedule and gradient
# checkpointing leave the weights as they are (a resumed run takes the new value and logs the change).
_MODEL = "model."
_MODEL_FREE = ("model.pretrained", "model.backend_schedule", "model.grad_checkpointing")
# Other keys a resumed run cannot honour: the optimizer state or the label space would not fit.
_FIXED = ("data.dataset", "data.embedded_", "optim.opt")
# Keys that name the run, not what it computes.
_NAMING = ("name", "output_dir")
# Keys of the learning-rate schedule: rebuilt from the new config at the resumed position.
_SCHEDULE_KEYS = ("epochs", "max_steps_per_epoch", "grad_accum_steps")


@dataclass
class Progress:
    """Where a run stands: the epoch and optimizer step it is at, the running sums of the epoch in progress
    (over all processes), the per-epoch history and the best epoch so far."""

    epoch: int = 0  # completed epochs
    step_in_epoch: int = 0  # optimizer steps done in the epoch in progress
    global_step: int = 0  # optimizer steps done in the run: the learning-rate schedule's position
    loss_sum: float = 0.0  # the epoch in progress: summed loss x images,
    correct: float = 0.0  # correct predictions
    count: float = 0.0  # and images, over all processes
    history: list[dict[str, Any]] = field(default_factory=list)
    best_acc1: float = -1.0
    best_epoch: int = 0

    def add_step(self, loss: float, correct: float, images: int) -> None:
        self.step_in_epoch += 1
        self.loss_sum += loss * images
        self.correct += correct
        self.count += images

    @property
    def train_loss(self) -> float:
        return self.loss_sum / self.count

    @property
    def train_acc(self) -> float:
        return 100.0 * self.correct / self.count

    def end_epoch(self, row: dict[str, Any]) -> bool:
        """Record the epoch's ``row`` (its ``val_acc1`` decides the best epoch); returns whether it is the best."""
        self.history.append(row)
        is_best = row["val_acc1"] > self.best_acc1
        if is_best:
            self.best_acc1, self.best_epoch = row["val_acc1"], self.epoch + 1
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.loss_sum = self.correct = self.count = 0.0
        return is_best

    def state(self) -> dict[str, Any]:
        """The checkpoint entries of the progress."""
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "partial": [self.loss_sum, self.correct, self.count], "history": [dict(r) for r in self.history],
                "best_acc1": self.best_acc1, "best_epoch": self.best_epoch}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Progress:
        loss_sum, correct, count = (float(v) for v in state["partial"])
        return cls(int(state["epoch"]), int(state["step_in_epoch"]), int(state["global_step"]), loss_sum, correct,
                   count, [dict(r) for r in state["history"]], float(state["best_acc1"]), int(state["best_epoch"]))


def _with_defaults(data: dict, defaults: dict) -> dict:
    out = dict(defaults)
    for key, value in data.items():
        both = isinstance(value, dict) and isinstance(defaults.get(key), dict) and key in ("model", "data", "optim")
        out[key] = _with_defaults(value, defaults[key]) if both else value
    return out


def _changes(stored: Mapping[str, Any], current: TrainConfig | Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    # a key that did not exist when the checkpoint was written had its default value
    stored = _with_defaults(dict(stored), config_to_dict(TrainConfig()))
    new = current if isinstance(current, TrainConfig) else dict(current)
    return {key: (old, new) for key, old, new in config_diff(stored, new)}


def _shapes_weights(key: str) -> bool:
    return key.startswith(_MODEL) and not key.startswith(_MODEL_FREE)


def model_changes(stored: Mapping[str, Any], current: TrainConfig | Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """The keys, as ``(key, stored, current)``, that make ``current``'s model another one than the model
    whose weights a checkpoint with config ``stored`` holds."""
    return [(key, old, new) for key, (old, new) in _changes(stored, current).items() if _shapes_weights(key)]


def check_resume_config(stored: Mapping[str, Any], current: TrainConfig | Mapping[str, Any]
                        ) -> dict[str, tuple[Any, Any]]:
    """The changes between a checkpoint's config and this run's, after refusing those that cannot be
    honoured (raises :class:`ConfigError` listing them)."""
    changes = {key: change for key, change in _changes(stored, current).items() if not key.startswith(_NAMING)
               and not key.startswith("model.pretrained")}
    fixed = {key: change for key, change in changes.items() if _shapes_weights(key) or key.startswith(_FIXED)}
    if fixed:
        listed = format_config_diff([(key, old, new) for key, (old, new) in fixed.items()])
        raise ConfigError(f"cannot resume with a different {', '.join(fixed)}: {listed}. The checkpoint's weights "
                          "and optimizer state belong to the old values; resume with them, or start a new run "
                          "that loads these weights with model.pretrained=<checkpoint> (and --overwrite or a new "
                          "name=)")
    return changes


def training_state(cfg: TrainConfig, progress: Progress, model: nn.Module, ema: nn.Module | None, optimizer: Any,
                   scheduler: Any, scaler: Any, rngs: list[dict], world_size: int,
                   class_names: list[str] | None = None) -> dict[str, Any]:
    """Everything a checkpoint holds (before :func:`covpool.train.checkpoint.with_checksums`); ``class_names``
    are the data set's, in label order."""
    from covpool import __version__

    config = config_to_dict(cfg)
    return {
        # timm's keys: timm.models.load_checkpoint(model, path, use_ema=True) reads them as they are
        "state_dict": model.state_dict(),
        "state_dict_ema": ema.state_dict() if ema is not None else None,
        "arch": cfg.model.name,
        "args": config,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        **progress.state(),
        "rng": rngs,
        "world_size": world_size,
        "config": config,  # the same object as "args": pickled once
        "class_names": list(class_names) if class_names is not None else None,
        "covpool_version": __version__,
    }


def restore_weights(state: Mapping[str, Any], model: nn.Module, ema: nn.Module | None, optimizer: Any,
                    scaler: Any) -> None:
    """Load a checkpoint's weights, EMA, optimizer and scaler states.

    The optimizer's state (momentum, Adam moments) comes from the checkpoint; its hyper-parameters (lr, weight
    decay, momentum, head multiplier) and the whole schedule come from this run's config. A timm scheduler is
    a function of the config and the global step, so it is rebuilt rather than loaded: an unchanged config
    resumes exactly, a changed one (epochs=3 after epochs=1, a lower optim.lr after a non-finite stop) takes
    effect from the resumed step."""
    import warnings

    model.load_state_dict(state["state_dict"])
    if ema is not None:
        if state.get("state_dict_ema") is None:
            warnings.warn("the checkpoint has no EMA weights; the EMA restarts from the current model", stacklevel=3)
            ema.load_state_dict(state["state_dict"])
        else:
            ema.load_state_dict(state["state_dict_ema"])
    fresh = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as err:
        raise ConfigError(f"cannot resume the optimizer state: {err} (the parameter groups changed; start "
                          "a new run with model.pretrained=<checkpoint> instead)") from err
    for group, hyper in zip(optimizer.param_groups, fresh):
        group.update(hyper)
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])


def resume_progress(state: Mapping[str, Any], changes: Mapping[str, tuple[Any, Any]], world_size: int,
                    steps_per_epoch: int) -> Progress:
    """The checkpoint's :class:`Progress` in this run's terms.

    The position inside an epoch counts optimizer steps of ``data.batch_size`` x ``grad_accum_steps`` images
    per process, so a run stopped mid-epoch keeps those until the epoch ends; with another number of
    processes it continues after the images already seen when they make a whole number of this run's steps
    (the processes' shards of an epoch are interleaved, so the first k steps of n processes are the first
    n·k samples of the epoch), and is refused otherwise. The schedule's position (``global_step``) is the
    run's position, ``epoch`` x this run's steps per epoch + the step in the epoch, so it ends where the new
    schedule ends whatever the number of processes or ``max_steps_per_epoch`` was before (it is the stored
    step when neither changed).

    Raises:
        ConfigError: a mid-epoch resume with another ``data.batch_size`` or ``grad_accum_steps``, or with a
            number of processes that does not divide the images already seen into whole steps.
    """
    progress = Progress.from_state(state)
    step = progress.step_in_epoch
    for key in ("grad_accum_steps", "data.batch_size") if step else ():
        if key in changes:
            old, new = changes[key]
            raise ConfigError(f"cannot resume mid-epoch (step {step}) with {key} {old} -> {new}: the position in "
                              "the epoch counts steps of data.batch_size x grad_accum_steps images. Resume with "
                              f"{key}={old} and change it once the epoch is done")
    stored_world = int(state.get("world_size", world_size))
    if step and stored_world != world_size:
        batches = step * stored_world  # batches of data.batch_size x grad_accum_steps images, all processes
        if batches % world_size:
            raise ConfigError(
                f"cannot resume mid-epoch (step {step} of {stored_world} processes) with {world_size} processes: "
                f"the {batches} batches of data.batch_size x grad_accum_steps images done are not a whole "
                f"number of steps of {world_size} processes. Resume with {stored_world} processes (or a number "
                f"that divides {batches}), or from a checkpoint written at the end of an epoch")
        progress.step_in_epoch = batches // world_size
    progress.global_step = progress.epoch * steps_per_epoch + progress.step_in_epoch
    return progress


def describe_resume(source: Any, progress: Progress, stored: Mapping[str, Any], changes: Mapping[str, tuple],
                    world_size: int, total_steps: int, lr: float) -> None:
    """Log where the run continues and what changed."""
    _log.info(f"resume: {source} at epoch {progress.epoch + 1}, step {progress.step_in_epoch} (global step "
              f"{progress.global_step})")
    stored_world = int(stored.get("world_size", world_size))
    if stored_world != world_size or int(stored["global_step"]) != progress.global_step:
        _log.info(f"resume: the checkpoint was written by {stored_world} process(es) at global step "
                  f"{stored['global_step']}; this run has {world_size} and continues the schedule at global step "
                  f"{progress.global_step} of {total_steps}")
    if changes:
        listed = format_config_diff([(key, old, new) for key, (old, new) in changes.items()])
        rebuilt = [key for key in changes if key in _SCHEDULE_KEYS or key.startswith("optim.")]
        _log.info(f"resume: config changed: {listed}" + (
            f"; optimizer hyper-parameters and scheduler rebuilt from the new config, continuing at global step "
            f"{progress.global_step} of {total_steps} with lr {lr:.3g}" if rebuilt else ""))
