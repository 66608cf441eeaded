"""Where each row of a megatron tensor lives in the HF checkpoint.

A megatron tensor is described as a concatenation, along its dim 0, of
:class:`Piece` objects: a row range of one HF tensor (read as stored, or
transposed for ``Conv1D`` ``[in, out]`` weights), or zero rows (vocab
padding).  With that description a tensor-parallel rank can compute which
bytes of which HF tensors make up *its* shard and read only those, instead of
materialising the full tensor and slicing it (see :mod:`.importer`).  The
pieces are derived from the same mapping kinds as the pure repacking functions
in :mod:`.packing`, and a test checks both give identical tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence


@dataclass(frozen=True)
class Piece:
    """``length`` megatron rows taken from HF tensor ``hf_name``.

    ``start`` is the offset along the HF dim that becomes megatron's dim 0:
    HF dim 0 normally, HF dim 1 when ``transposed``.  ``hf_name=None`` means
    zero rows (padding).
    """

    hf_name: str | None
    start: int
    length: int
    transposed: bool = False


def pieces_for(kind: str, hf_names: Sequence[str], hf_shapes: Sequence[tuple[int, ...]],
               sym: dict[str, int]) -> tuple[Piece, ...] | None:
    """The piece list for one mapping kind (``None`` when the kind has no row layout)."""
    first, shape = hf_names[0], hf_shapes[0]
    if kind == "copy":
        return (Piece(first, 0, shape[0]),)
    if kind == "vocab":
        pad = sym["Vp"] - sym["V"]
        return (Piece(first, 0, sym["V"]),) + ((Piece(None, 0, pad),) if pad else ())
    if kind == "gate_up":
        return tuple(Piece(n, 0, s[0]) for n, s in zip(hf_names, hf_shapes))
    if kind == "qkv":
        return tuple(_qkv_pieces(hf_names, sym))
    if kind == "fused_qkv":
        q, k, v = (hf_names[0],) * 3
        return tuple(_qkv_pieces((q, k, v), sym, k_start=sym["Q"], v_start=sym["Q"] + sym["KV"]))
    if kind == "transposed":
        return (Piece(first, 0, shape[1], transposed=True),)
    if kind == "transposed_qkv":
        return tuple(_c_attn_pieces(first, len(shape) == 2, sym))
    return None


def _qkv_pieces(names: Sequence[str], sym: dict[str, int], k_start: int = 0, v_start: int = 0) -> Iterator[Piece]:
    """Per query group g: its q heads, then its k head, then its v head.

    ``k_start``/``v_start`` are where k and v begin in their tensor: 0 for
    separate tensors, after q (and k) for one fused ``[q; k; v]`` tensor.
    """
    q, k, v = names
    groups, d = sym["G"], sym["D"]
    q_rows = sym["Q"] // groups
    for g in range(groups):
        yield Piece(q, g * q_rows, q_rows)
        yield Piece(k, k_start + g * d, d)
        yield Piece(v, v_start + g * d, d)


def _c_attn_pieces(name: str, is_weight: bool, sym: dict[str, int]) -> Iterator[Piece]:
    """A transposed ``[q | k | v]`` (GPT-2 ``c_attn``): megatron wants per-head blocks."""
    hidden, d = sym["NH"] * sym["D"], sym["D"]
    for h in range(sym["NH"]):
        for part in range(3):
            yield Piece(name, part * hidden + h * d, d, transposed=is_weight)


def split_rows(pieces: Sequence[Piece], start: int, stop: int) -> Iterator[tuple[Piece, int, int, int]]:
    """``(piece, first, count, out_offset)`` for the pieces overlapping megatron rows ``start:stop``.

    ``first`` is the first row *within the piece*, ``out_offset`` where those
    rows land relative to ``start``.
    """
    position = 0
    for piece in pieces:
        lo, hi = max(start, position), min(stop, position + piece.length)
        if lo < hi:
            yield piece, lo - position, hi - lo, lo - start
        position += piece.length
        if position >= stop:
            return


def rows_from_pieces(pieces: Sequence[Piece], shape: tuple[int, ...], tensors: Mapping[str, Any],
                     start: int, stop: int) -> Any:
    """Megatron rows ``start:stop`` (of a tensor of ``shape``) assembled from in-memory source ``tensors``.

    The in-memory twin of what the engine's importer reads from files, for
    checking a table: its rows must equal the kind's repacking of the whole
    tensors (``tests/core/test_core_conversion_table.py`` does, for every kind).
    """
    import torch

    parts = []
    for piece, first, count, _ in split_rows(pieces, start, stop):
        if piece.hf_name is None:
            parts.append(torch.zeros(count, *shape[1:]))
            continue
        source = tensors[piece.hf_name]
        lo = piece.start + first
        parts.append(source[:, lo:lo + count].t() if piece.transposed else source[lo:lo + count])
    return torch.cat(parts)
