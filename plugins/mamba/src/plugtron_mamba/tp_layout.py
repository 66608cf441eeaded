"""Which rows of a full (single-process) tensor a tensor-parallel rank holds.

Most parameters follow the core's rule (:func:`plugtron.sharding.tp_slice`):
one contiguous chunk per rank along ``partition_dim``. The Mamba mixer's fused
tensors do not. Their rows are a concatenation of *blocks*, and every block is
split across ranks on its own, so rank ``r`` holds the ``r``-th chunk of each
block, in block order:

=========================  =====================================================
``mixer.in_proj.weight``   ``[z | x | B | C | dt]`` = ``[d_inner, d_inner, G*N, G*N, H]``
``mixer.conv1d.weight``    ``[x | B | C]`` = ``[d_inner, G*N, G*N]`` (also ``.bias``)
``mlp.linear_fc1.weight``  ``[gate | up]`` = ``[ffn, ffn]`` with gated linear units
=========================  =====================================================

(``d_inner`` mixer width, ``G`` groups, ``N`` state size, ``H`` heads; heads and
groups are what TP divides.) The gated-linear-unit case is the core's
``glu=True`` rule: a block list generalises it. ``dt_bias``, ``A_log``, ``D``
and ``mixer.norm.weight`` are plain chunks; megatron flags them
``tensor_model_parallel`` without a ``partition_dim``, so megatron's default
attribute (``-1``) is harmless for them, but it would cut the kernel axis of
the 3-D ``conv1d.weight``: the block rule always splits dim 0.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from plugtron import sharding


def row_blocks(name: str, config: Any) -> Optional[list[int]]:
    """Full-size row blocks of parameter ``name`` (any prefix), or ``None`` for the core's plain rule."""
    if name.endswith(("mixer.in_proj.weight", "mixer.conv1d.weight", "mixer.conv1d.bias")):
        sizes = config.mamba_sizes()
        gn = sizes["groups"] * sizes["state"]
        if name.endswith("in_proj.weight"):
            return [sizes["inner"], sizes["inner"], gn, gn, sizes["heads"]]
        return [sizes["inner"], gn, gn]
    if name.endswith("mlp.linear_fc1.weight") and config.gated_linear_unit:
        return [config.ffn_hidden_size, config.ffn_hidden_size]
    return None


def slice_blocks(full: torch.Tensor, blocks: Sequence[int], rank: int, size: int) -> torch.Tensor:
    """Rank ``rank``'s rows: chunk ``rank`` of every block, concatenated in block order."""
    if sum(blocks) != full.shape[0]:
        raise ValueError(f"row blocks {list(blocks)} do not add up to the {full.shape[0]} rows of the tensor")
    bad = [b for b in blocks if b % size]
    if bad:
        raise ValueError(f"row blocks {bad} cannot be split evenly across {size} tensor-parallel ranks")
    return torch.cat([block.chunk(size, dim=0)[rank] for block in full.split(list(blocks), dim=0)], dim=0)


def join_blocks(parts: Sequence[torch.Tensor], blocks: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`slice_blocks`: the full tensor from every rank's rows, in rank order."""
    size = len(parts)
    local = [b // size for b in blocks]
    pieces = [part.split(local, dim=0) for part in parts]  # [rank][block]
    return torch.cat([torch.cat([pieces[r][k] for r in range(size)], dim=0) for k in range(len(blocks))], dim=0)


def tp_slice(full: torch.Tensor, name: str, param: Any, rank: int, size: int, config: Any) -> torch.Tensor:
    """The part of ``full`` that tensor-parallel ``rank`` holds for parameter ``name``."""
    blocks = row_blocks(name, config)
    if blocks is None or size == 1 or not getattr(param, "tensor_model_parallel", False):
        return sharding.tp_slice(full, param, rank, size)
    return slice_blocks(full, blocks, rank, size)


def tp_gather(local: torch.Tensor, name: str, param: Any, group: Any, size: int, config: Any) -> torch.Tensor:
    """The full tensor of parameter ``name`` from every rank's ``local`` part (a collective)."""
    blocks = row_blocks(name, config)
    if blocks is None or size == 1 or not getattr(param, "tensor_model_parallel", False):
        return sharding.tp_gather(local, param, group, size)
    import torch.distributed as dist

    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local.contiguous(), group=group)
    return join_blocks(parts, blocks)
