"""Distributed-checkpoint (``sharded_state_dict``) layout for TorchMambaMixer.

A megatron distributed checkpoint stores *global* tensors assembled from every
tensor-parallel rank's shard.  For the Mamba mixer a plain "concatenate the
shards along dim 0" would be wrong: rank r's ``in_proj`` rows are
``[z_r | x_r | B_r | C_r | dt_r]``, so concatenating ranks interleaves the five
blocks.  megatron therefore saves ``in_proj.weight`` as five separately sharded
tensors (keys ``in_proj.weight.z`` ... ``.dt``) and ``conv1d.{weight,bias}`` as
three (``.x``, ``.B``, ``.C``), which makes checkpoints independent of the TP size.

This module produces exactly those keys, shapes and offsets so that checkpoints
are interchangeable between megatron's ``MambaMixer`` and ``TorchMambaMixer``
(megatron's own helper lives in a module that imports Triton, hence this
re-implementation).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, List, Optional, Sequence

import torch

from megatron.core import parallel_state
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.mapping import ReplicaId, ShardedTensorFactory
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)

if TYPE_CHECKING:  # pragma: no cover
    from .mixer import TorchMambaMixer

__all__ = ["split_sharded_tensor", "mamba_mixer_sharded_state_dict"]


def split_sharded_tensor(
    sharded: ShardedTensor, sizes: Sequence[int], names: Sequence[str], dim: int = 0
) -> ShardedTensorFactory:
    """Wrap ``sharded`` in a factory that saves it as consecutive named pieces.

    Piece ``names[k]`` covers ``sizes[k]`` local rows along ``dim`` and is saved
    under ``f"{key}.{names[k]}"`` as its own TP-sharded tensor; on load the pieces
    are concatenated back in order.
    """
    sizes, names = list(sizes), list(names)
    if len(sizes) != len(names):
        raise ValueError(f"{len(sizes)} sizes but {len(names)} names")
    template = sharded.without_data()  # the factory must not pin the original tensor
    if sum(sizes) != template.local_shape[dim]:
        raise ValueError(
            f"sizes {sizes} do not cover local dim {dim} of size {template.local_shape[dim]}"
        )

    @torch.no_grad()
    def build(
        key: str, data: torch.Tensor, replica_id: ReplicaId, flattened_range: Optional[slice]
    ) -> List[ShardedTensor]:
        whole = replace(
            template,
            key=key,
            data=data,
            dtype=data.dtype,
            replica_id=replica_id,
            flattened_range=flattened_range,
        )
        pieces: List[ShardedTensor] = []
        start = 0
        for size, name in zip(sizes, names):
            for piece in whole.narrow(dim, start, size):
                piece.key = f"{piece.key}.{name}"
                pieces.append(piece)
            start += size
        return pieces

    @torch.no_grad()
    def merge(loaded: List[torch.Tensor]) -> torch.Tensor:
        return torch.cat(loaded)

    return ShardedTensorFactory(sharded.key, sharded.data, build, merge, sharded.replica_id)


def mamba_mixer_sharded_state_dict(
    mixer: "TorchMambaMixer",
    prefix: str = "",
    sharded_offsets: tuple = (),
    metadata: Optional[dict] = None,
) -> dict:
    """Sharded state dict of ``mixer`` laid out like megatron's MambaMixer."""
    metadata = ensure_metadata_has_dp_cp_group(metadata)
    tp_group = mixer.tp_group
    if tp_group is None:
        tp_group = parallel_state.get_tensor_model_parallel_group()

    # Own parameters (dt_bias, A_log, D): TP-sharded along dim 0.
    own: dict = {}
    mixer._save_to_state_dict(own, "", keep_vars=True)
    result = make_sharded_tensors_for_checkpoint(
        own,
        prefix,
        {"A_log": 0, "dt_bias": 0, "D": 0},
        sharded_offsets,
        tp_group=tp_group,
        dp_cp_group=metadata["dp_cp_group"],
    )
    for name, child in mixer.named_children():
        child_prefix = f"{prefix}{name}."
        if name in ("conv1d", "norm"):
            # Plain torch modules whose every tensor is TP-local along dim 0.
            child_sd = child.state_dict(prefix="", keep_vars=True)
            result.update(
                make_sharded_tensors_for_checkpoint(
                    child_sd,
                    child_prefix,
                    {key: 0 for key in child_sd},
                    sharded_offsets,
                    tp_group=tp_group,
                    dp_cp_group=metadata["dp_cp_group"],
                )
            )
        else:
            result.update(
                sharded_state_dict_default(
                    child, child_prefix, sharded_offsets, metadata, tp_group=tp_group
                )
            )

    d_in, gn = mixer.d_inner_local_tp, mixer.ngroups_local_tp * mixer.d_state
    in_key = f"{prefix}in_proj.weight"
    result[in_key] = split_sharded_tensor(
        result[in_key], [d_in, d_in, gn, gn, mixer.nheads_local_tp], ["z", "x", "B", "C", "dt"]
    )
    for conv_name in ("conv1d.weight", "conv1d.bias"):
        key = f"{prefix}{conv_name}"
        if key in result:
            result[key] = split_sharded_tensor(result[key], [d_in, gn, gn], ["x", "B", "C"])
    return result
