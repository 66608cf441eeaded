"""Where a global (single-process) tensor lives in a TP/PP/VP layout.

One place for the rules every family and converter needs: which global layer
a chunk's local layer is, and which slice of a full tensor a tensor-parallel
rank holds (plain split along ``partition_dim``; tensors made of blocks, like
gated-linear-unit weights ``[gate; up]``, keep chunk r of every block).

Routed experts of megatron's MoE layers follow the *expert* layout: an
expert-parallel rank holds experts ``[rank x local, (rank + 1) x local)``
under local indices (``local_experts.{i}`` in SequentialMLP, ``weight{i}`` in
the grouped MLPs), and each expert is split over the expert-tensor-parallel
group, not the tensor-parallel one (:func:`expert_global_name`,
:func:`shard_group`).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import torch

_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")
_LOCAL_EXPERT = re.compile(r"(\.experts\.local_experts\.)(\d+)\.")
_GROUPED_EXPERT = re.compile(r"(\.experts\.linear_fc[12]\.(?:weight|bias))(\d+)$")


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
    """``decoder.layers.0.x`` of a chunk whose offset is 4 -> ``decoder.layers.4.x``.

    Multi-token-prediction layers (``mtp.layers.N``) are numbered on their own
    and all live on the last stage: they keep their names.
    """
    if local_name.startswith("mtp.") or ".mtp." in local_name:
        return local_name
    return _LAYER.sub(lambda m: f"{m.group(1)}layers.{int(m.group(2)) + offset}.", local_name, count=1)


def partition_dim(param: Any) -> int:
    # megatron marks some TP parameters (Mamba's conv1d, A_log ...) with -1: they split along rows.
    dim = getattr(param, "partition_dim", 0)
    return 0 if dim is None or dim < 0 else dim


def _row_blocks(full_size: int, glu: bool, blocks: Sequence[int] | None) -> list[int] | None:
    if glu:
        return [full_size // 2, full_size // 2]
    return None if blocks is None else list(blocks)


def local_row_ranges(size: int, tp: int, rank: int, blocks: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of a full dimension ``size`` that ``rank`` holds, in order.

    The same rule as :func:`tp_slice`, as index ranges, for readers that fetch
    only those rows from disk: chunk r of every block (one block when ``None``).
    """
    ranges, offset = [], 0
    for block in [size] if blocks is None else blocks:
        per = block // tp
        ranges.append((offset + rank * per, offset + (rank + 1) * per))
        offset += block
    return ranges


def slice_blocks(full: "torch.Tensor", blocks: Sequence[int], rank: int, size: int, dim: int = 0) -> "torch.Tensor":
    """Rank ``rank``'s share of a tensor made of concatenated blocks: chunk r of every block.

    Gated MLPs are blocks ``[ffn, ffn]`` (gate, up); Mamba's in_proj is
    ``[z, x, B, C, dt]``. Each block is split evenly across ranks.
    """
    import torch

    if sum(blocks) != full.shape[dim]:
        raise ValueError(f"row blocks {list(blocks)} do not add up to the {full.shape[dim]} rows of the tensor")
    uneven = [b for b in blocks if b % size]
    if uneven:
        raise ValueError(f"row blocks {uneven} cannot be split evenly across {size} tensor-parallel ranks")
    return torch.cat([block.chunk(size, dim=dim)[rank] for block in full.split(list(blocks), dim=dim)], dim=dim)


def join_blocks(parts: Sequence["torch.Tensor"], blocks: Sequence[int], dim: int = 0) -> "torch.Tensor":
    """Inverse of :func:`slice_blocks`: the full tensor from every rank's part, in rank order."""
    import torch

    size = len(parts)
    local = [b // size for b in blocks]
    pieces = [part.split(local, dim=dim) for part in parts]  # [rank][block]
    return torch.cat([torch.cat([pieces[r][k] for r in range(size)], dim=dim) for k in range(len(blocks))], dim=dim)


def tp_slice(
    full: "torch.Tensor", param: Any, rank: int, size: int, *, glu: bool = False, blocks: Sequence[int] | None = None
) -> "torch.Tensor":
    """The part of ``full`` that tensor-parallel ``rank`` holds for ``param``.

    ``glu=True`` is the gated-MLP layout ``[gate; up]``; ``blocks`` gives any
    other block layout (full-size block lengths along the partition dim).
    """
    if size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = partition_dim(param)
    row_blocks = _row_blocks(full.shape[dim], glu, blocks)
    if row_blocks is None:
        return full.chunk(size, dim=dim)[rank]
    return slice_blocks(full, row_blocks, rank, size, dim)


def tp_gather(
    local: "torch.Tensor", param: Any, group: Any, size: int, *, glu: bool = False, blocks: Sequence[int] | None = None
) -> "torch.Tensor":
    """Inverse of :func:`tp_slice`: the full tensor from every rank's slice (a collective)."""
    import torch
    import torch.distributed as dist

    if size == 1 or not getattr(param, "tensor_model_parallel", False):
        return local
    dim = partition_dim(param)
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local.contiguous(), group=group)
    row_blocks = _row_blocks(local.shape[dim] * size, glu, blocks)
    return torch.cat(parts, dim=dim) if row_blocks is None else join_blocks(parts, row_blocks, dim)


# -- routed experts -------------------------------------------------------------------------
def is_expert_name(name: str) -> bool:
    """Whether ``name`` is a routed expert's tensor (shared experts and routers are not)."""
    return ".mlp.experts." in name or name.startswith("mlp.experts.")


def expert_global_name(local_name: str, ep_rank: int, num_local_experts: int) -> str:
    """``...experts.local_experts.1.x`` on expert-parallel rank 2 with 4 local experts -> ``...local_experts.9.x``."""
    offset = ep_rank * num_local_experts
    name = _LOCAL_EXPERT.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + offset}.", local_name, count=1)
    return _GROUPED_EXPERT.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + offset}", name, count=1)


def model_global_name(local_name: str, offset: int, config: Any) -> str:
    """A chunk's parameter (or buffer) name as the whole model spells it: the global layer number
    (:func:`to_global_name`) and, for routed experts, the global expert index (:func:`expert_global_name`)."""
    name = to_global_name(local_name, offset)
    experts = getattr(config, "num_moe_experts", None)
    if not experts or not is_expert_name(name):
        return name
    from megatron.core import parallel_state

    ep = parallel_state.get_expert_model_parallel_world_size()
    return expert_global_name(name, parallel_state.get_expert_model_parallel_rank(), experts // ep)


def shard_group(name: str) -> tuple[Any, int, int]:
    """(group, size, rank) that splits the tensor ``name``: expert-tensor-parallel for routed experts, else TP."""
    from megatron.core import parallel_state

    if is_expert_name(name):
        return (
            parallel_state.get_expert_tensor_parallel_group(),
            parallel_state.get_expert_tensor_parallel_world_size(),
            parallel_state.get_expert_tensor_parallel_rank(),
        )
    return (
        parallel_state.get_tensor_model_parallel_group(),
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_rank(),
    )
