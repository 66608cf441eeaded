"""Where a global (single-process) tensor lives in a TP/PP/VP layout.

One place for the rules every family and converter needs: which global layer
a chunk's local layer is, and which slice of a full tensor a tensor-parallel
rank holds (plain split along ``partition_dim``; gated-linear-unit weights
keep ``[gate_r; up_r]`` per rank).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")


def layer_offset(chunk: Any) -> int:
    """Global index of the chunk's first decoder layer (megatron's own rule)."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    inner = unwrap(chunk)
    decoder = getattr(inner, "decoder", None)
    if decoder is not None and getattr(decoder, "layers", None) is not None and len(decoder.layers):
        return decoder.layers[0].layer_number - 1
    return get_transformer_layer_offset(inner.config, vp_stage=getattr(inner, "vp_stage", None))


def unwrap(chunk: Any) -> Any:
    """Strip DDP / Float16Module wrappers (they keep the model in ``.module``)."""
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk


def to_global_name(local_name: str, offset: int) -> str:
    """``decoder.layers.0.x`` of a chunk whose offset is 4 -> ``decoder.layers.4.x``."""
    return _LAYER.sub(lambda m: f"{m.group(1)}layers.{int(m.group(2)) + offset}.", local_name, count=1)


def tp_slice(full: "torch.Tensor", param: Any, rank: int, size: int, *, glu: bool = False) -> "torch.Tensor":
    """The part of ``full`` that tensor-parallel ``rank`` holds for ``param``."""
    if size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = getattr(param, "partition_dim", 0)
    if glu:
        halves = full.chunk(2, dim=dim)
        return __import__("torch").cat([h.chunk(size, dim=dim)[rank] for h in halves], dim=dim)
    return full.chunk(size, dim=dim)[rank]


def tp_gather(local: "torch.Tensor", param: Any, group: Any, size: int, *, glu: bool = False) -> "torch.Tensor":
    """Inverse of :func:`tp_slice`: the full tensor from every rank's slice."""
    import torch
    import torch.distributed as dist

    if size == 1 or not getattr(param, "tensor_model_parallel", False):
        return local
    dim = getattr(param, "partition_dim", 0)
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local.contiguous(), group=group)
    if glu:
        gates, ups = zip(*(p.chunk(2, dim=dim) for p in parts))
        return torch.cat([torch.cat(gates, dim=dim), torch.cat(ups, dim=dim)], dim=dim)
    return torch.cat(parts, dim=dim)
