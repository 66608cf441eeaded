"""Pure-PyTorch Mamba-2 building blocks (no Triton, mamba_ssm or causal_conv1d).

* :func:`ssd_chunked` / :func:`ssd_sequential_reference` - the Mamba-2 scan
  (``recurrence`` holds its chunk-to-chunk state hand-over and that step's backward).
* :class:`GatedRMSNorm` - grouped RMSNorm with SiLU gate (mamba_ssm semantics).
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
