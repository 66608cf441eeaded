"""Full-width q/k RMSNorm (``qk_norm_scope: full``, Olmo2's q_norm / k_norm).

Olmo2 normalises the whole query projection of a token (all
``num_attention_heads x head_dim`` channels) with one RMSNorm, and the key
projection (``num_query_groups x head_dim``) with another, before splitting
into heads and before RoPE. megatron's ``q_layernorm`` slot receives the
query already split into heads, ``[s, b, heads_on_this_rank, head_dim]``, at
the same point (before RoPE), so the norm is placed there and flattens the
heads back.

Under tensor parallelism each rank holds ``heads / TP`` consecutive heads
(megatron's linear_qkv groups are in HF head order), i.e. one contiguous
slice of the full width. The mean of squares needs every rank's part: the
local sums of squares are all-reduced over the TP group, forward and
backward (each rank's output depends on every rank's input through that sum,
so the gradient of the sum is the sum of every rank's contribution; megatron's
``reduce_from_tensor_model_parallel_region`` has an identity backward and
would give wrong gradients). The weight is a TP shard along dim 0, marked
with megatron's ``tensor_model_parallel`` / ``partition_dim`` /
``partition_stride`` attributes, so checkpoints and
:mod:`plugtron.sharding` treat it as a plain row split. It is not marked
``sequence_parallel``: each rank sees the whole sequence here (after the
column-parallel gather), so its gradient is complete for its shard.
"""

from __future__ import annotations

from typing import Any

import torch


class _AllReduceSum(torch.autograd.Function):
    """Sum over a process group in forward and in backward."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        out = tensor.clone()
        torch.distributed.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        out = grad.contiguous().clone()
        torch.distributed.all_reduce(out, group=ctx.group)
        return out, None


class FullWidthRMSNorm(torch.nn.Module):
    """RMSNorm over all ``heads`` heads of q (or k) of a token; holds this rank's ``heads / TP`` of the weight.

    Built through the layer spec as ``q_layernorm`` (``heads =
    num_attention_heads``) and ``k_layernorm`` (``heads = num_query_groups``);
    ``hidden_size`` is the head dimension megatron passes to q/k norms. Computed
    in float32 and cast back (Olmo2: ``(weight * normalised).to(dtype)``);
    ``layernorm_zero_centered_gamma`` scales by ``1 + weight``.
    """

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5, heads: int = 0, **_: Any) -> None:
        super().__init__()
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        tp = config.tensor_model_parallel_size
        if heads <= 0 or heads % tp:
            raise ValueError(f"full-width q/k norm over {heads} heads cannot be split over tensor_model_parallel_size={tp}")
        self.eps = eps
        self.width = heads * hidden_size
        self.zero_centered = bool(config.layernorm_zero_centered_gamma)
        init = torch.zeros if self.zero_centered else torch.ones
        self.weight = torch.nn.Parameter(init(heads // tp * hidden_size, dtype=config.params_dtype))
        set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core import parallel_state

        flat = x.reshape(*x.shape[:-2], -1).float()
        squares = flat.pow(2).sum(-1, keepdim=True)
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            squares = _AllReduceSum.apply(squares, parallel_state.get_tensor_model_parallel_group())
        normed = flat * torch.rsqrt(squares / self.width + self.eps)
        weight = self.weight.float()
        if self.zero_centered:
            weight = 1.0 + weight
        return (weight * normed).to(x.dtype).view(x.shape)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> Any:
        """The weight as a TP-sharded tensor along dim 0 (megatron's default would call it replicated)."""
        from megatron.core import parallel_state
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        tp_group = parallel_state.get_tensor_model_parallel_group()  # megatron drops it when only dp_cp_group is given
        dp_cp_group = (metadata or {}).get("dp_cp_group") or parallel_state.get_data_parallel_group(with_context_parallel=True)
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {"weight": 0}, sharded_offsets, tp_group=tp_group, dp_cp_group=dp_cp_group)

    def extra_repr(self) -> str:
        return f"width={self.width}, local={self.weight.shape[0]}, eps={self.eps}"
