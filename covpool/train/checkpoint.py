"""Checkpoints that survive a crash, load with ``torch.load(..., weights_only=True)`` and are checked on load.

A checkpoint holds tensors and plain containers only. The weights sit under timm's keys, so
``timm.models.load_checkpoint(model, path, use_ema=True)`` and ``pretrained_cfg_overlay=dict(file=path)``
read them: ``state_dict`` (the model), ``state_dict_ema`` (the EMA, when the run keeps one), ``arch`` (the
model name) and ``args`` (the config as a plain dict, also under ``config``); ``class_names`` lists the
classes in label order, so a checkpoint alone rebuilds a usable model (:func:`covpool.load_model`). Next to
them: optimizer, scheduler and scaler state dicts, the RNG states as tensors and numbers (torch CPU, CUDA,
numpy, python ``random``), counters, the metrics history and ``checksum``, a BLAKE2b digest of each set of weights that
:func:`load_checkpoint` verifies, so a damaged file is an error rather than silently wrong weights.

Files are written atomically (:func:`covpool.outputs.atomic_write`): a temporary file ``.<name>.<random>.tmp`` in the
same folder moved into place with :func:`os.replace`, so a crash mid-write leaves the previous file whole and
no partial file under the real name; :func:`covpool.outputs.remove_leftover_temporaries` clears what a killed
process left behind. A run folder keeps two checkpoints, :data:`LAST` and :data:`BEST`.
A command reads a checkpoint once (:meth:`Checkpoint.read`) and hands the result on.
"""
from __future__ import annotations

import hashlib
import pickle
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..outputs import atomic_write, first_line, moved_names, remove_leftover_temporaries

__all__ = ["CheckpointError", "Checkpoint", "atomic_save", "load_checkpoint", "weights_checksum", "with_checksums",
           "rng_state", "set_rng_state", "LAST", "BEST"]

#: the file name of the checkpoint a run folder keeps of its latest state (what ``--resume`` continues)
LAST = "last.pt"
#: the file name of the checkpoint a run folder keeps of its best epoch (highest validation top-1)
BEST = "best.pt"

#: the keys under which a checkpoint stores weights (timm's names)
WEIGHT_KEYS = ("state_dict", "state_dict_ema")
#: keys every checkpoint written by ``covpool train`` has (older releases stored ``model``/``ema``)
REQUIRED_KEYS = ("state_dict", "config")


class CheckpointError(ValueError):
    """A checkpoint file is empty, not a PyTorch file, not written by ``covpool train``, or damaged."""


def atomic_save(obj: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` of ``obj`` (a checkpoint's dict of tensors and plain containers) to ``path`` atomically
    (:func:`covpool.outputs.atomic_write`: a temporary file in the same directory, flushed and fsynced, then
    ``os.replace``); returns the path. On any error the temporary file is removed and the old ``path``, if any,
    is untouched.

    Raises:
        OSError: the write failed (full disk, quota, I/O error); the message names ``path`` and the cause,
            which torch otherwise reports as a bare "unexpected pos" RuntimeError.
    """
    return atomic_write(path, lambda f: torch.save(obj, f),
                        advice="Free space in (or choose another) output_dir, then continue with --resume")


def _remove_stale_temp_files(folder: str | Path, names: tuple[str, ...], suffix: str = ".tmp") -> list[Path]:
    """What ``remove_stale_temp_files`` was: :func:`covpool.outputs.remove_leftover_temporaries` of each name."""
    return [tmp for name in names for tmp in remove_leftover_temporaries(Path(folder) / name)]


__getattr__ = moved_names(__name__, {"remove_stale_temp_files": (
    f"{__name__}:_remove_stale_temp_files",
    "covpool.outputs.remove_leftover_temporaries(folder / name) for each name")})


def weights_checksum(state_dict: Mapping[str, Any]) -> str:
    """BLAKE2b digest (40 hex digits) of ``state_dict``'s names, dtypes, shapes and bytes, in key order (a value
    that is not a tensor by its ``repr``): what :func:`with_checksums` stores and :func:`load_checkpoint` checks.

    >>> import torch
    >>> weights_checksum({"w": torch.zeros(2)}) == weights_checksum({"w": torch.zeros(2, dtype=torch.float64)})
    False
    """
    digest = hashlib.blake2b(digest_size=20)
    for key, value in state_dict.items():
        digest.update(key.encode())
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()


def with_checksums(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with a ``checksum`` entry covering each of its weight sets (:data:`WEIGHT_KEYS`)."""
    sums = {key: weights_checksum(state[key]) for key in WEIGHT_KEYS if state.get(key) is not None}
    return {**state, "checksum": {"algorithm": "blake2b-160", **sums}}


def _advice(path: Path) -> str:
    other = LAST if path.name == BEST else BEST
    return (f"Resume from another checkpoint instead (e.g. {path.parent / other}: --resume-from <file>), or start "
            "the run again with --overwrite.")


def _describe_load_error(path: Path, err: Exception) -> str:
    if isinstance(err, pickle.UnpicklingError) and "weights_only" in str(err):
        return (f"checkpoint {str(path)!r} holds Python objects that a safe (weights_only) load refuses, so it was "
                f"not written by covpool train ({first_line(err)})")
    return (f"checkpoint {str(path)!r} is not a readable PyTorch file: truncated, damaged or of another "
            f"format ({type(err).__name__}: {first_line(err)})")


def _upgrade(ckpt: dict[str, Any]) -> dict[str, Any]:
    """Checkpoints of covpool 0.1 stored the weights under ``model`` / ``ema``."""
    if "state_dict" not in ckpt and isinstance(ckpt.get("model"), Mapping) and "config" in ckpt:
        ckpt = dict(ckpt)
        ckpt["state_dict"] = ckpt.pop("model")
        ckpt["state_dict_ema"] = ckpt.pop("ema", None)
    return ckpt


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", verify: bool = True
                    ) -> dict[str, Any]:
    """Load a checkpoint written by ``covpool train`` with ``weights_only=True`` (no arbitrary pickles).

    Args:
        path: the checkpoint file (a run folder's ``last.pt`` or ``best.pt``).
        map_location: where its tensors go, as ``torch.load`` takes it (``"cpu"``, a ``torch.device``).
        verify: check each set of weights against the checksum stored with it (:func:`weights_checksum`).

    Returns:
        The checkpoint's dict; one written by covpool 0.1 (weights under ``model`` / ``ema``) comes back with
        today's keys (``state_dict`` / ``state_dict_ema``).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        CheckpointError: the file is empty, not a PyTorch file, a plain state dict or another program's
            checkpoint, or (``verify``) its weights do not match the checksum stored with them.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found; runs keep {LAST} and {BEST} in "
                                "<output_dir>/<name>/")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is empty (0 bytes): a copy or a write that did not "
                              f"finish (full disk?). {_advice(path)}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch.load raises anything from EOFError to KeyError on foreign bytes
        raise CheckpointError(f"{_describe_load_error(path, err)}. {_advice(path)}") from err
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(ckpt).__name__}, not the dict that "
                              f"covpool train writes. {_advice(path)}")
    ckpt = _upgrade(ckpt)
    missing = [key for key in REQUIRED_KEYS if key not in ckpt]
    if missing:
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            raise CheckpointError(
                f"checkpoint {str(path)!r} is a plain state_dict ({len(ckpt)} tensors, e.g. {next(iter(ckpt))!r}), "
                f"not a covpool training checkpoint (keys {', '.join(REQUIRED_KEYS)}, ...): it cannot be resumed "
                f"or evaluated on its own. Start from these weights with model.pretrained={path}.")
        found = ", ".join(map(repr, list(ckpt)[:8])) + (", ..." if len(ckpt) > 8 else "")
        raise CheckpointError(f"checkpoint {str(path)!r} lacks covpool's keys {', '.join(missing)} (it has "
                              f"{found or 'no keys'}); it was not written by covpool train. {_advice(path)}")
    if verify and isinstance(ckpt.get("checksum"), Mapping):
        for key in WEIGHT_KEYS:
            expected = ckpt["checksum"].get(key)
            if expected is not None and (ckpt.get(key) is None or weights_checksum(ckpt[key]) != expected):
                raise CheckpointError(f"checkpoint {str(path)!r} is damaged: its {key!r} weights do not match the "
                                      f"checksum stored with them (bit rot or an altered file). {_advice(path)}")
    return ckpt


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read and verified once (:meth:`Checkpoint.read`), with the file it came from for messages; what a
    command hands on instead of the path, so nothing reads (and hashes) the file a second time.

    Args:
        path: the file it was read from.
        state: its contents, as :func:`load_checkpoint` returns them.
    """

    path: Path
    state: Mapping[str, Any]

    @classmethod
    def read(cls, path: str | Path) -> Checkpoint:
        """:func:`load_checkpoint` of ``path`` (on the CPU)."""
        return cls(Path(path), load_checkpoint(path, map_location="cpu"))

    @property
    def config(self) -> dict[str, Any]:
        """The config the run that wrote it used, as a plain dict."""
        config = self.state.get("config")
        if not isinstance(config, dict):
            raise CheckpointError(f"checkpoint {str(self.path)!r} holds no covpool config; give the run's config "
                                  "with --config")
        return config

    @property
    def class_names(self) -> list[str] | None:
        """The class names, in label order, of the data set the model was trained on (``class_names``; None
        for checkpoints written before covpool stored them)."""
        names = self.state.get("class_names")
        return [str(n) for n in names] if names is not None else None

    @property
    def weights(self) -> Mapping[str, Any]:
        """The model's weights (``state_dict``)."""
        return self.state["state_dict"]


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop touches, as tensors and numbers (``weights_only``-loadable)."""
    py_version, py_keys, py_gauss = random.getstate()
    np_state = np.random.get_state(legacy=True)
    # numpy's global RandomState is an MT19937, whose legacy state is a tuple (a dict is for other generators)
    assert isinstance(np_state, tuple)
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np_state
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": py_version, "keys": torch.tensor(py_keys, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNGs from ``state``, what :func:`rng_state` captured (CUDA states only when as many CUDA
    devices are here)."""
    torch.set_rng_state(state["torch"].cpu())
    py = state["python"]
    random.setstate((py["version"], tuple(int(k) for k in py["keys"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["gauss"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
