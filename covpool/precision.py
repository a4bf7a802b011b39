"""The mixed-precision modes of the commands: ``none``, ``bf16`` and ``fp16``, spelled here once.

The config key ``amp`` (:mod:`covpool.train.config`, its ``--help`` and its check), the training step, evaluation
and prediction (:mod:`covpool.train`) and ``covpool bench --models --amp`` all read :data:`AMP_MODES`: a mode's
autocast dtype, whether it needs CUDA and whether its backward needs a gradient scaler. The square roots
themselves run in float32 or float64 in every mode (the library's rule); a mode decides what the rest of the
model computes in.

>>> [mode.name for mode in AMP_MODES.values()]
['none', 'bf16', 'fp16']
>>> amp_mode("fp16").needs_cuda, amp_mode("bf16").needs_cuda
(True, False)
"""
from __future__ import annotations

import difflib
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from types import MappingProxyType

import torch

__all__ = ["AmpMode", "AMP_MODES", "amp_mode"]


@dataclass(frozen=True)
class AmpMode:
    """One mixed-precision mode.

    Attributes:
        name: what a config (``amp: bf16``) and ``covpool bench --amp`` call it.
        dtype: the autocast dtype, or None for no autocast (float32 throughout).
        needs_cuda: float16 autocast on the CPU is slow and unscaled, so ``fp16`` runs on CUDA only.
        scaled: the backward needs a gradient scaler (float16's narrow range underflows small gradients).
        about: the mode in a few words, for ``--help`` and the config reference.
    """

    name: str
    dtype: torch.dtype | None
    needs_cuda: bool
    scaled: bool
    about: str

    def autocast(self, device: torch.device | str) -> AbstractContextManager:
        """The autocast region of this mode on ``device`` (a ``nullcontext`` for ``none``)."""
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=self.dtype)

    def refusal(self, device_type: str, option: str = "amp=") -> str | None:
        """Why this mode cannot run on a device of type ``device_type`` (``"cpu"``, ``"cuda"``), with the mode
        spelled as ``option`` spells it (``"amp="`` in a config, ``"--amp "`` for ``covpool bench``); None when
        it can.

        >>> amp_mode("fp16").refusal("cpu")
        'amp=fp16 needs CUDA (float16 autocast on the CPU is slow and unscaled); use amp=bf16'
        """
        if not self.needs_cuda or device_type == "cuda":
            return None
        fallback = next(m.name for m in AMP_MODES.values() if m.dtype is not None and not m.needs_cuda)
        dtype = str(self.dtype).removeprefix("torch.")
        return (f"{option}{self.name} needs CUDA ({dtype} autocast on the CPU is slow and unscaled); use "
                f"{option}{fallback}")


#: the modes, in the order ``--help`` lists them
AMP_MODES = MappingProxyType({
    "none": AmpMode("none", None, needs_cuda=False, scaled=False, about="no autocast, float32 throughout"),
    "bf16": AmpMode("bf16", torch.bfloat16, needs_cuda=False, scaled=False, about="bfloat16 autocast, CPU or CUDA"),
    "fp16": AmpMode("fp16", torch.float16, needs_cuda=True, scaled=True,
                    about="float16 autocast with a gradient scaler, CUDA only"),
})


def amp_mode(name: str) -> AmpMode:
    """The mode called ``name``.

    Raises:
        ValueError: no mode has that name (the message lists them and the closest).
    """
    if name not in AMP_MODES:
        close = difflib.get_close_matches(str(name), list(AMP_MODES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown mixed-precision mode {name!r}{hint}; valid: {', '.join(AMP_MODES)}")
    return AMP_MODES[name]
