"""Pure-PyTorch Mamba-2 building blocks (no Triton, mamba_ssm or causal_conv1d).

* :func:`ssd_chunked` / :func:`ssd_sequential_reference` - the Mamba-2 scan
  (``ssd_grad`` is its hand-written backward, ``recurrence`` the chunk-to-chunk
  state hand-over, forward and backward).
* :class:`GatedRMSNorm` - grouped RMSNorm with SiLU gate (mamba_ssm semantics).
* ``conv`` - the causal depthwise convolution over time, forward and backward.
* ``inner`` - conv + scan + gated norm as one autograd function: what the mixer
  runs between its two projections.
* :class:`TorchMambaMixer` - megatron-core ``MambaMixer`` replacement with an
  identical parameter layout, for CPU runs, tests and reference numerics.

The mixer needs megatron-core; it is imported lazily so that the scan and the
norm can be used with PyTorch alone.
"""

from __future__ import annotations

from typing import Any

from .norm import GatedRMSNorm, gated_rms_norm
from .ssd import ssd_chunked, ssd_sequential_reference

__all__ = [
    "GatedRMSNorm",
    "TorchMambaMixer",
    "TorchMambaMixerSubmodules",
    "gated_rms_norm",
    "init_A_log",
    "init_dt_bias",
    "mamba_mixer_sharded_state_dict",
    "ssd_chunked",
    "ssd_sequential_reference",
    "split_sharded_tensor",
]

_LAZY = {
    "TorchMambaMixer": "mixer",
    "TorchMambaMixerSubmodules": "params",
    "init_A_log": "params",
    "init_dt_bias": "params",
    "mamba_mixer_sharded_state_dict": "sharding",
    "split_sharded_tensor": "sharding",
}


def __getattr__(name: str) -> Any:
    """Import megatron-dependent names on first use (megatron import is slow)."""
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
