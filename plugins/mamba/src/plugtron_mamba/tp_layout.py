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
groups are what TP divides.) The slicing itself is the core's
(:func:`plugtron.sharding.slice_blocks`); this module only knows the blocks.
``dt_bias``, ``A_log``, ``D`` and ``mixer.norm.weight`` are plain chunks;
megatron flags them ``tensor_model_parallel`` with ``partition_dim`` -1, which
the core reads as rows.
"""

from __future__ import annotations

from typing import Any, Optional

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


slice_blocks = sharding.slice_blocks
join_blocks = sharding.join_blocks


def tp_slice(full: torch.Tensor, name: str, param: Any, rank: int, size: int, config: Any) -> torch.Tensor:
    """The part of ``full`` that tensor-parallel ``rank`` holds for parameter ``name``."""
    return sharding.tp_slice(full, param, rank, size, blocks=row_blocks(name, config))


def tp_gather(local: torch.Tensor, name: str, param: Any, group: Any, size: int, config: Any) -> torch.Tensor:
    """The full tensor of parameter ``name`` from every rank's ``local`` part (a collective)."""
    return sharding.tp_gather(local, param, group, size, blocks=row_blocks(name, config))
