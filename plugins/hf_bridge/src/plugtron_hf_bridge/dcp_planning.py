"""Distributed-checkpoint planning for megatron's stacked tensors, in time linear in their chunks.

megatron saves a layer stack's parameters with *prepended axes*: one global
tensor per parameter name, shaped ``(layers, [experts,] *weight)``, with one
chunk per layer (and expert, and TP slice). A 1B Qwen3-MoE checkpoint with 12
layers of 64 experts has 768 chunks per expert weight; DeepSeek-V3 has
58 x 256 = 14,848. Three steps of the stock path compare chunks pairwise, and
each orders chunks along the tensor's *largest* dimension, which every one of
these chunks spans fully, so each compares every chunk with every other:

- torch's ``ShardedTensor`` validation, run on the sharded tensor megatron
  builds for every name (``validate_non_overlapping_shards_metadata``);
- torch's read planning (``create_read_items_for_chunk_list``);
- torch's validation of the global save plan (``_validate_global_plan``).

Counted on that 1B checkpoint: 1.2 million shard-pair checks per save and per
load in the first, 1.5 million more per save and 3 million more per load in the
others; 1.5-2 s of a 4 s load (see ``benchmarks/README.md``, row 7d). They grow
with the square of the chunks: on this machine's CPU, minutes per save and per
load at DeepSeek-V3's size (extrapolated).

This module computes the same results with the chunks grouped by their offsets
on the leading dimensions where every chunk has size 1 (the layer and expert
axes): only chunks of one (layer, expert) are compared. :class:`StackedShards`
hands torch's planner one name's local chunks through DCP's checkpointable
protocol (``__create_write_items__`` / ``__create_chunk_list__`` /
``__get_tensor_shard__``, the protocol megatron's own ``CheckpointableShardedTensor``
implements) instead of a torch ``ShardedTensor``. The chunks, records and
files are the ones megatron's path writes, so megatron-LM loads them as before
(``tests/hf_bridge/test_dcp_planning.py`` checks both directions).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterable, Sequence

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata, ChunkStorageMetadata, MetadataIndex, TensorProperties, TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadItemType, ReadItem, TensorWriteData, WriteItem, WriteItemType


class StackedShards(torch.Tensor):
    """One name's local megatron ``ShardedTensor`` s with prepended axes, as DCP sees a checkpointable tensor.

    Each shard is one chunk: offsets ``global_offset``, sizes ``(1,) * prepend_axis_num + local_shape``,
    as megatron's ``sharded_tensor_to_torch_sharded_tensor`` describes it. Its data is the shard's
    own tensor (the parameter, for a model's state dict), so loading writes into the parameter.
    """

    @staticmethod
    def __new__(cls, shards: Sequence[Any]) -> "StackedShards":
        data = shards[0].data
        return torch.Tensor._make_wrapper_subclass(cls, torch.Size(shards[0].global_shape), dtype=data.dtype,
                                                   device=data.device)

    def __init__(self, shards: Sequence[Any]) -> None:
        self.shards = list(shards)
        self.chunks = [ChunkStorageMetadata(offsets=torch.Size(shard.global_offset),
                                            sizes=torch.Size((1,) * shard.prepend_axis_num + tuple(shard.local_shape)))
                       for shard in self.shards]
        self._at = {tuple(chunk.offsets): index for index, chunk in enumerate(self.chunks)}

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        size = torch.Size(self.shards[0].global_shape)
        return [WriteItem(index=MetadataIndex(fqn, chunk.offsets), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=chunk, size=size,
                                                      properties=TensorProperties.create_from_tensor(shard.data)))
                for shard, chunk in zip(self.shards, self.chunks)]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return list(self.chunks)

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        at = self._at.get(tuple(index.offset or ()))
        if at is None:
            raise ValueError(f"no local shard of {index.fqn} at offset {index.offset}")
        return self.shards[at].data.view(self.chunks[at].sizes)

    def unwrapped(self) -> list[torch.Tensor]:
        """The shards' tensors, in megatron's order and shapes (what its ``_unwrap_pyt_sharded_tensor`` returns)."""
        return [shard.data for shard in self.shards]

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        raise NotImplementedError(f"{cls.__name__} only describes chunks to the checkpoint planner ({func})")

    def __repr__(self) -> str:
        return f"StackedShards({self.shards[0].key}, {len(self.shards)} shards)"


def stackable(shards: Sequence[Any]) -> bool:
    """Shards :class:`StackedShards` describes exactly as megatron's legacy path would; others stay megatron's."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    first = shards[0]
    if not all(isinstance(shard, ShardedTensor) for shard in shards) or not first.prepend_axis_num:
        return False
    if any(shard.flattened_range is not None or shard.data is None or not shard.has_regular_grid for shard in shards):
        return False
    return len({tuple(shard.global_offset) for shard in shards}) == len(shards)


def stacked(shards: Sequence[Any], *, loading: bool) -> StackedShards:
    """:class:`StackedShards` of ``shards`` with the preparation megatron's path gives them.

    Detached; made contiguous where they are not (a copy, which loading then
    fills and megatron's ``load_state_dict`` copies back); zeroed before a load
    that may read only part of them (``allow_shape_mismatch``).
    """
    for shard in shards:
        shard.data = shard.data.detach()
        if not shard.data.is_contiguous():
            shard.data = shard.data.contiguous()
        if loading and shard.allow_shape_mismatch:
            shard.data.zero_()
    return StackedShards(shards)


def to_dcp_state_dict(flat: dict[str, list[Any]], *, loading: bool) -> dict[str, Any]:
    """megatron's ``mcore_to_pyt_state_dict``, with stacked names as :class:`StackedShards`."""
    from megatron.core.dist_checkpointing.strategies.torch import mcore_to_pyt_state_dict

    ours = {key: stacked(shards, loading=loading) for key, shards in flat.items() if stackable(shards)}
    theirs = mcore_to_pyt_state_dict({key: shards for key, shards in flat.items() if key not in ours}, loading)
    return {key: ours[key] if key in ours else theirs[key] for key in flat}


def unwrap(value: Any) -> Any:
    """A loaded value back in megatron's form: what ``_unwrap_pyt_sharded_tensor`` does, for ours too."""
    from megatron.core.dist_checkpointing.strategies.torch import _unwrap_pyt_sharded_tensor

    return value.unwrapped() if isinstance(value, StackedShards) else _unwrap_pyt_sharded_tensor(value)


def _leading_unit_dims(*chunk_lists: Iterable[ChunkStorageMetadata]) -> int:
    """How many leading dimensions every chunk has size 1 in: the layer (and expert) axes of a stack."""
    sizes = [chunk.sizes for chunks in chunk_lists for chunk in chunks]
    if not sizes:
        return 0
    lead = 0
    while lead < len(sizes[0]) and all(size[lead] == 1 for size in sizes):
        lead += 1
    return lead


def _buckets(chunks: Sequence[ChunkStorageMetadata], lead: int) -> dict[tuple, list[int]]:
    grouped: dict[tuple, list[int]] = defaultdict(list)
    for index, chunk in enumerate(chunks):
        grouped[tuple(chunk.offsets[:lead])].append(index)
    return grouped


def _overlap(saved: ChunkStorageMetadata, local: ChunkStorageMetadata) -> tuple[list, list, list] | None:
    """(offsets in ``saved``, offsets in ``local``, lengths) of their common box; None when they do not meet."""
    in_saved, in_local, lengths = [], [], []
    for s_at, s_len, l_at, l_len in zip(saved.offsets, saved.sizes, local.offsets, local.sizes):
        start, end = max(s_at, l_at), min(s_at + s_len, l_at + l_len)
        if end <= start:
            return None
        in_saved.append(start - s_at)
        in_local.append(start - l_at)
        lengths.append(end - start)
    return in_saved, in_local, lengths


def read_items(fqn: str, stored: TensorStorageMetadata, local_chunks: Sequence[ChunkStorageMetadata]) -> list[ReadItem]:
    """The reads that fill ``local_chunks`` from the stored chunks: torch's resharding, bucketed by stack position."""
    saved = stored.chunks
    lead = _leading_unit_dims(saved, local_chunks)
    buckets = _buckets(saved, lead)
    items = []
    for local_index, local in enumerate(local_chunks):
        for saved_index in buckets.get(tuple(local.offsets[:lead]), ()):
            region = _overlap(saved[saved_index], local)
            if region is not None:
                in_saved, in_local, lengths = region
                items.append(ReadItem(
                    type=LoadItemType.TENSOR, dest_index=MetadataIndex(fqn, local.offsets, local_index),
                    dest_offsets=torch.Size(in_local), lengths=torch.Size(lengths),
                    storage_index=MetadataIndex(fqn, saved[saved_index].offsets, saved_index),
                    storage_offsets=torch.Size(in_saved)))
    return items


def local_load_plan(state_dict: dict[str, Any], metadata: Any, *, strict: bool = True) -> list[ReadItem]:
    """torch's ``create_default_local_load_plan`` (same checks and messages), planning chunked tensors by bucket."""
    from torch.distributed.checkpoint.planner_helpers import _create_read_items

    items: list[ReadItem] = []
    for fqn, obj in state_dict.items():
        stored = metadata.state_dict_metadata.get(fqn)
        if stored is None:
            if strict:
                raise RuntimeError(f"Missing key in checkpoint state_dict: {fqn}.")
            continue
        if isinstance(stored, TensorStorageMetadata) and getattr(obj, "size", None) is not None \
                and stored.size != obj.size():
            raise ValueError(f"Size mismatch between saved {stored.size} and current: {obj.size()} for {fqn}")
        if isinstance(stored, TensorStorageMetadata) and hasattr(obj, "__create_chunk_list__"):
            items += read_items(fqn, stored, obj.__create_chunk_list__())
        else:
            items += _create_read_items(fqn, stored, obj)
    return items


def _first_overlap(chunks: Sequence[ChunkStorageMetadata]) -> tuple[Any, Any] | None:
    """Two chunks that overlap, by a sweep along the dimension where their starts differ most."""
    if len(chunks) < 2 or not chunks[0].offsets:
        return (chunks[0], chunks[1]) if len(chunks) > 1 else None
    dim = max(range(len(chunks[0].offsets)), key=lambda d: len({chunk.offsets[d] for chunk in chunks}))
    active: list[tuple[int, ChunkStorageMetadata]] = []
    for chunk in sorted(chunks, key=lambda c: c.offsets[dim]):
        start = chunk.offsets[dim]
        active = [(end, other) for end, other in active if end > start]
        for _, other in active:
            if _overlap(chunk, other) is not None:
                return chunk, other
        active.append((start + chunk.sizes[dim], chunk))
    return None


def global_plan_errors(metadata: Any, plans: int) -> list[str]:
    """torch's ``_validate_global_plan`` (bounds, overlaps, coverage when several ranks save), bucketed."""
    errors = []
    for key, stored in metadata.state_dict_metadata.items():
        if isinstance(stored, BytesStorageMetadata) or len(stored.size) == 0:
            continue
        volume = 0
        for chunk in stored.chunks:
            if any(at < 0 or length < 0 or at + length > dim
                   for at, length, dim in zip(chunk.offsets, chunk.sizes, stored.size)):
                errors.append(f"key:{key} has out of bounds chunk: tensor-size:{stored.size} chunk: {chunk}")
            volume += math.prod(chunk.sizes)
        lead = _leading_unit_dims(stored.chunks)
        for members in _buckets(stored.chunks, lead).values():
            pair = _first_overlap([stored.chunks[index] for index in members])
            if pair is not None:
                errors.append(f"key:{key} has overlapping chunks: {pair[0]} {pair[1]}")
        if plans > 1 and volume != math.prod(stored.size):
            errors.append(f"key:{key} invalid fill tensor-volume: {math.prod(stored.size)} chunks-volume: {volume}")
    return errors
