"""The pure-torch repackings between source and megatron tensor layouts.

Layout facts (each checked against megatron-core by the parity tests):

- megatron's ``linear_qkv`` rows are grouped per query group:
  ``[q heads of g; k of g; v of g]`` for each group g; most sources keep q, k
  and v apart, or concatenate them whole (``[q; k; v]``, e.g. Phi-3's
  ``qkv_proj``).
- megatron's gated ``linear_fc1`` is ``[gate; up]`` along the output rows.
- ``Conv1D`` weights (GPT-2) are ``[in, out]``, transposed against ``nn.Linear``.
- megatron pads the vocabulary; padding rows are zeros on import and dropped
  on export.

torch is imported inside the functions: tables that name them are built
without torch (a launcher checks a checkpoint before any rank starts).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import MappingError

if TYPE_CHECKING:
    from torch import Tensor


def pack_qkv(q: Tensor, k: Tensor, v: Tensor, num_query_groups: int, head_dim: int, name: str = "linear_qkv") -> Tensor:
    """Interleave separate q/k/v (weights ``[rows, hidden]`` or biases ``[rows]``) per query group."""
    import torch

    g, d = num_query_groups, head_dim
    if q.shape[0] % (g * d) or k.shape[0] != g * d or v.shape[0] != g * d or not q.shape[1:] == k.shape[1:] == v.shape[1:]:
        raise MappingError(name, f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit {g} groups of head_dim {d}")
    rest = q.shape[1:]
    parts = [q.reshape(g, -1, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def unpack_qkv(qkv: Tensor, num_query_groups: int, head_dim: int, name: str = "linear_qkv") -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`pack_qkv`: split a megatron ``linear_qkv`` weight or bias into q, k, v."""
    g, d = num_query_groups, head_dim
    rows, rest = qkv.shape[0], qkv.shape[1:]
    if rows % (g * d) or rows // (g * d) < 3:
        raise MappingError(name, f"{rows} rows cannot hold {g} groups of (>=1 q + k + v) heads of size {d}")
    q_rows = (rows // (g * d) - 2) * d
    grouped = qkv.reshape(g, rows // g, *rest)
    q = grouped[:, :q_rows].reshape(-1, *rest).contiguous()
    k = grouped[:, q_rows:q_rows + d].reshape(-1, *rest).contiguous()
    v = grouped[:, q_rows + d:].reshape(-1, *rest).contiguous()
    return q, k, v


def split_fused_qkv(qkv: Tensor, q_rows: int, kv_rows: int, name: str = "qkv_proj") -> tuple[Tensor, Tensor, Tensor]:
    """A whole ``[q; k; v]`` concatenation (weight or bias) cut into its three parts."""
    if qkv.shape[0] != q_rows + 2 * kv_rows:
        raise MappingError(name, f"{qkv.shape[0]} rows are not q {q_rows} + k {kv_rows} + v {kv_rows}")
    q, k, v = qkv.split([q_rows, kv_rows, kv_rows], dim=0)
    return q, k, v


def pack_gate_up(gate: Tensor, up: Tensor, name: str = "linear_fc1") -> Tensor:
    """megatron's gated ``linear_fc1`` is ``[gate; up]`` along the output rows."""
    import torch

    if gate.shape != up.shape:
        raise MappingError(name, f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    return torch.cat([gate, up], dim=0)


def unpack_gate_up(fc1: Tensor, name: str = "linear_fc1") -> tuple[Tensor, Tensor]:
    if fc1.shape[0] % 2:
        raise MappingError(name, f"{fc1.shape[0]} rows cannot be split into equal gate and up halves")
    gate, up = fc1.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()


def transpose(weight: Tensor) -> Tensor:
    """``Conv1D`` ``[in, out]`` <-> ``nn.Linear`` ``[out, in]`` (self-inverse)."""
    return weight.t().contiguous()


def transposed_qkv_to_grouped(c_attn: Tensor, num_heads: int, head_dim: int) -> Tensor:
    """GPT-2's ``c_attn`` (Conv1D weight ``[H, 3H]`` or bias ``[3H]``) -> megatron ``linear_qkv``."""
    rows = transpose(c_attn) if c_attn.dim() == 2 else c_attn
    if rows.shape[0] % 3:
        raise MappingError("c_attn", f"shape {tuple(c_attn.shape)} is not [q|k|v] concatenated")
    q, k, v = rows.chunk(3, dim=0)
    return pack_qkv(q, k, v, num_heads, head_dim)  # multi-head attention: one group per head


def grouped_qkv_to_transposed(qkv: Tensor, num_heads: int, head_dim: int) -> Tensor:
    import torch

    rows = torch.cat(unpack_qkv(qkv, num_heads, head_dim), dim=0)
    return transpose(rows) if rows.dim() == 2 else rows


def pad_vocab(weight: Tensor, padded_size: int) -> Tensor:
    import torch

    if weight.shape[0] > padded_size:
        raise MappingError("word_embeddings", f"{weight.shape[0]} vocab rows exceed the padded size {padded_size}")
    return torch.cat([weight, weight.new_zeros(padded_size - weight.shape[0], *weight.shape[1:])], dim=0)


def unpad_vocab(weight: Tensor, vocab_size: int) -> Tensor:
    return weight[:vocab_size].contiguous()
