"""megatron-compatible parameter plumbing for the pure-PyTorch Mamba mixer.

Kept apart from :mod:`.mixer` so that the initialisation recipes can be reused
(e.g. by converters) and tested on their own.  Every recipe reproduces what
megatron-core 0.16.1's ``MambaMixer.__init__`` does, so a freshly built
``TorchMambaMixer`` is statistically indistinguishable from a megatron one.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, ContextManager, Optional, Tuple, Union

import torch

from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.transformer.spec_utils import ModuleSpec

__all__ = [
    "TorchMambaMixerSubmodules",
    "init_A_log",
    "init_dt_bias",
    "mark_tensor_parallel",
    "rng_fork",
]


@dataclass
class TorchMambaMixerSubmodules:
    """Specs for the two projections, field-for-field like megatron's
    ``MambaMixerSubmodules`` (which lives in a module that imports Triton, so it
    cannot be imported on CPU-only machines).  Either class works as
    ``submodules``: the mixer only reads ``.in_proj`` and ``.out_proj``."""

    in_proj: Union[ModuleSpec, type, None] = None
    out_proj: Union[ModuleSpec, type, None] = None


def rng_fork() -> ContextManager[Any]:
    """Context in which megatron draws the conv/dt/A initial values.

    megatron uses the model-parallel CUDA RNG stream.  That stream only exists
    once ``model_parallel_cuda_manual_seed`` ran on a CUDA machine; elsewhere the
    default generator is used (there is nothing to fork on CPU).
    """
    tracker = get_cuda_rng_tracker()
    if torch.cuda.is_available() and tracker.is_initialized():
        return tracker.fork()
    return contextlib.nullcontext()


def mark_tensor_parallel(param: Optional[torch.Tensor]) -> None:
    """Flag a parameter as TP-local, exactly as megatron's mixer does.

    megatron sets only ``tensor_model_parallel`` (no ``partition_dim`` /
    ``partition_stride``) on conv1d, dt_bias, A_log, D and the norm weight; code
    such as gradient-norm clipping keys off this flag to avoid double counting.
    """
    if param is not None:
        setattr(param, "tensor_model_parallel", True)


def init_dt_bias(
    n: int,
    dt_min: float,
    dt_max: float,
    dt_init_floor: float,
    device: Optional[torch.device] = None,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Softplus-inverse of step sizes drawn log-uniformly from ``[dt_min, dt_max]``.

    Storing ``softplus^{-1}(dt)`` means ``softplus(dt_bias)`` (what the forward
    computes when the projected dt is zero) starts inside the chosen range.
    ``x + log(-expm1(-x))`` is a numerically stable inverse softplus.
    """
    log_lo, log_hi = math.log(dt_min), math.log(dt_max)
    dt = torch.exp(torch.rand(n, device=device, dtype=dtype) * (log_hi - log_lo) + log_lo)
    dt = dt.clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))


def init_A_log(
    n: int,
    A_init_range: Tuple[float, float],
    perform_initialization: bool = True,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """``log(A)`` with ``A ~ U(A_init_range)``, always float32 (as megatron keeps it).

    The forward uses ``A = -exp(A_log)``, so the decay rate stays negative under
    any update.  Without ``perform_initialization`` megatron leaves the tensor
    uninitialised; here it is ``log(1) = 0`` so that it is at least deterministic.
    """
    lo, hi = A_init_range
    if not (lo > 0 and hi >= lo):
        raise ValueError(f"A_init_range must satisfy 0 < low <= high, got {A_init_range}")
    A = torch.ones(n, dtype=torch.float32, device=device)
    if perform_initialization:
        A.uniform_(lo, hi)
    return torch.log(A)
