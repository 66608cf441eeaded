"""HF tensors as views of the model: gathered to one rank, cut into HF tensors, written, never assembled.

Exporting used to build every tensor twice in new memory: the tensor-parallel
gather (``all_gather`` into buffers, then ``cat``) on *every* rank of the
group, and then the HF tensors (``q_proj`` and friends are row blocks spread
over a megatron ``linear_qkv``). New memory is the expensive part here: the
first touch of fresh pages on this machine's VM made those copies most of an
export. So:

* :func:`gather_rows` gathers a tensor-parallel parameter to the group's
  first rank only (point to point; the other ranks receive nothing) and hands
  it over as :class:`Stacked`, the received slices in row order, not joined.
  Only a parameter split along its columns (row-parallel ``linear_proj`` /
  ``linear_fc2``) is joined, since its rows cross every slice.
* :func:`hf_tensors` cuts each HF tensor out of that by the mapping's
  ``pieces`` (the row layout the importer reads by) as
  :class:`~.safetensors_write.Rows` of views, which the writer writes in
  place. Mappings without a row layout (GPT-2's transposed ``Conv1D``) go
  through the adapter's ``to_hf`` as before.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence, Union

import torch

from .safetensors_write import Rows


class Stacked:
    """A tensor given as consecutive dim-0 blocks (views of other tensors), in order."""

    def __init__(self, blocks: Sequence[torch.Tensor]) -> None:
        self.blocks = list(blocks)
        self.shape = (sum(block.shape[0] for block in self.blocks), *self.blocks[0].shape[1:])
        self.dtype = self.blocks[0].dtype

    def rows(self, start: int, length: int) -> list[torch.Tensor]:
        """Views covering rows ``start:start+length``."""
        out, at = [], 0
        for block in self.blocks:
            lo, hi = max(start, at), min(start + length, at + block.shape[0])
            if lo < hi:
                out.append(block.narrow(0, lo - at, hi - lo))
            at += block.shape[0]
        return out

    def tensor(self) -> torch.Tensor:
        return torch.cat(self.blocks) if len(self.blocks) > 1 else self.blocks[0]


Full = Union[torch.Tensor, Stacked]


def as_tensor(full: Full) -> torch.Tensor:
    return full.tensor() if isinstance(full, Stacked) else full


def gather_rows(local: torch.Tensor, param: Any, group: Any, tp: int, blocks: Sequence[int] | None) -> Full | None:
    """The full tensor on the group's first rank (a collective of the tensor-parallel group); None elsewhere.

    The same layout rule as :func:`plugtron.sharding.tp_gather` (chunk r of
    every block), in the form of :func:`plugtron.sharding.local_row_ranges`.
    """
    import torch.distributed as dist

    from plugtron.sharding import join_blocks, local_row_ranges, partition_dim

    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return local
    local = local.contiguous()
    ranks = [dist.get_global_rank(group, r) for r in range(tp)]
    if dist.get_rank() != ranks[0]:
        dist.send(local, dst=ranks[0], group=group)
        return None
    parts = [local] + [torch.empty_like(local) for _ in ranks[1:]]
    for part, rank in zip(parts[1:], ranks[1:]):
        dist.recv(part, src=rank, group=group)
    dim = partition_dim(param)
    size = local.shape[dim] * tp
    if dim != 0:
        return torch.cat(parts, dim=dim) if blocks is None else join_blocks(parts, list(blocks), dim)
    views = []
    for rank, part in enumerate(parts):
        at = 0
        for start, stop in local_row_ranges(size, tp, rank, blocks):
            views.append((start, part.narrow(0, at, stop - start)))
            at += stop - start
    return Stacked([view for _, view in sorted(views, key=lambda item: item[0])])


def hf_tensors(mapping: Any, full: Full, dtype: torch.dtype | None = None) -> Iterator[tuple[str, Any]]:
    """``(hf_name, tensor)`` for one megatron tensor; a tensor may be :class:`~.safetensors_write.Rows`."""
    rows = _rows(mapping, full)
    pairs = zip(mapping.hf_names, rows if rows is not None else mapping.to_hf(as_tensor(full)))
    for name, tensor in pairs:
        yield name, tensor if dtype is None else _cast(tensor, dtype)


def _rows(mapping: Any, full: Full) -> list[Any] | None:
    """Each HF tensor of ``mapping`` as row views of ``full``, or None when its pieces cannot say."""
    pieces = getattr(mapping, "pieces", None)
    if pieces is None or any(piece.transposed for piece in pieces) or tuple(full.shape) != mapping.megatron_shape:
        return None
    found: dict[str, list[tuple[int, int, int]]] = {name: [] for name in mapping.hf_names}
    at = 0
    for piece in pieces:
        if piece.hf_name is not None:
            found[piece.hf_name].append((piece.start, at, piece.length))
        at += piece.length
    out = []
    for name, shape in zip(mapping.hf_names, mapping.hf_shapes):
        ranges = sorted(found[name])
        if not _tiles(ranges, shape) or tuple(full.shape[1:]) != tuple(shape[1:]):
            return None
        views = [view for _, offset, length in ranges for view in _views(full, offset, length)]
        out.append(views[0] if len(views) == 1 else Rows(tuple(views)))
    return out


def _tiles(ranges: list[tuple[int, int, int]], shape: tuple[int, ...]) -> bool:
    """The HF rows ``ranges`` cover ``0:rows`` exactly, in order."""
    expected = 0
    for start, _, length in ranges:
        if start != expected:
            return False
        expected += length
    return bool(ranges) and expected == (shape[0] if shape else 1)


def _views(full: Full, start: int, length: int) -> list[torch.Tensor]:
    return full.rows(start, length) if isinstance(full, Stacked) else [full.narrow(0, start, length)]


def _cast(tensor: Any, dtype: torch.dtype) -> Any:
    if isinstance(tensor, Rows):
        return Rows(tuple(part.to(dtype) for part in tensor.parts))
    return tensor.to(dtype)
