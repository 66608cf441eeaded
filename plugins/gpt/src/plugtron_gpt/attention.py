"""Core attention on ``torch.nn.functional.scaled_dot_product_attention``.

Used by the ``torch`` layer spec. It needs neither megatron's global attention
buffer nor its CUDA causal mask, and picks torch's fastest kernel per device.
Tensors arrive as megatron lays them out: q [sq, b, heads, d], k/v
[sk, b, groups, d]; the output is [sq, b, heads * d].

Two variants (see :mod:`plugtron_gpt.variant_rules` for the fields):

* Sliding window: a layer is windowed when megatron's own
  ``is_layer_window_attention(window_size, window_attn_skip_freq, layer_number)``
  says so; ``window_size = (left, right)`` lets query i see keys
  ``i - left <= j <= i + right`` (on top of causality), i.e. megatron's
  ``get_sliding_window_causal_mask``. Given as a boolean mask to SDPA.
* Logit soft-capping (``softcap``, a spec parameter): SDPA cannot apply a
  function between the scaled scores and the softmax, so those layers compute
  attention explicitly, in the order Gemma-2 defines: scores x scale, then
  ``cap * tanh(scores / cap)``, then the mask, softmax in float32 cast back to
  the query dtype, dropout, values.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import is_layer_window_attention


class SDPACoreAttention(MegatronModule):
    def __init__(
        self,
        config: Any,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
        softcap: float | None = None,
        **_: Any,
    ) -> None:
        super().__init__(config=config)
        self.attn_mask_type = attn_mask_type
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        head_dim = config.kv_channels
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        if config.apply_query_key_layer_scaling:
            raise ValueError("the torch layer spec does not implement apply_query_key_layer_scaling")
        windowed = is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number)
        self.window: tuple[int, int] | None = tuple(config.window_size) if windowed else None  # type: ignore[assignment]
        self.softcap = softcap

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Any = None,
        packed_seq_params: Any = None,
        **_: Any,
    ) -> torch.Tensor:
        if packed_seq_params is not None:
            raise NotImplementedError("the torch layer spec does not support packed sequences")
        mask_type = attn_mask_type or self.attn_mask_type
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        if k.shape[1] != q.shape[1]:
            repeat = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        causal = mask_type == AttnMaskType.causal and attention_mask is None
        dropout = self.dropout if self.training else 0.0
        if self.window is None and self.softcap is None:
            mask = None if attention_mask is None else ~attention_mask
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=self.scale)
        else:
            allowed = self._allowed(q.shape[2], k.shape[2], attention_mask, causal, q.device)
            if self.softcap is None:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout, scale=self.scale)
            else:
                out = self._capped(q, k, v, allowed, dropout)
        b, heads, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, heads * d)

    def _allowed(self, sq: int, sk: int, attention_mask: torch.Tensor | None, causal: bool, device: torch.device) -> torch.Tensor | None:
        """Boolean mask, True where a query may attend: the given mask or causality, and the window.

        Query i sits at key position ``i + sk - sq`` (megatron's alignment of
        the two lengths in ``get_sliding_window_causal_mask``).
        """
        allowed = None if attention_mask is None else ~attention_mask
        offset = torch.arange(sk, device=device)[None, :] - (torch.arange(sq, device=device)[:, None] + sk - sq)  # j - i
        if causal:
            allowed = offset <= 0
        if self.window is not None:
            left, right = self.window  # -1: unbounded on that side (megatron's convention)
            inside = torch.ones_like(offset, dtype=torch.bool)
            if left >= 0:
                inside &= offset >= -left
            if right >= 0:
                inside &= offset <= right
            allowed = inside if allowed is None else allowed & inside
        return allowed

    def _capped(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None, dropout: float) -> torch.Tensor:
        cap = self.softcap
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scale
        scores = torch.tanh(scores / cap) * cap
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        probs = F.dropout(probs, p=dropout, training=dropout > 0)
        return torch.matmul(probs, v)
