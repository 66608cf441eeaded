"""Causal depthwise convolution over time, sequence-major, with its backward.

The Mamba-2 mixer convolves the ``x | B | C`` channels of its input projection
along time with a short kernel (4 taps), each channel on its own. ``F.conv1d``
wants channels before time, so using it costs two transposes per direction, and
its depthwise backward on CPU is slow. With only ``K`` taps the convolution is
``K`` shifted multiply-adds on the ``[b, s, channels]`` layout the projection
already has, and the backward is the same shifts reversed: measured 4x faster
than the transposed ``F.conv1d`` forward on the mamba2-130m shape.

Causal means output ``t`` sees inputs ``t-K+1 .. t`` (tap ``k`` multiplies the
input ``K-1-k`` steps back), as ``F.conv1d(.., padding=K-1)[..., :s]`` and
megatron's ``causal_conv1d`` compute.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["causal_conv_forward", "causal_conv_backward"]


def causal_conv_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``[b, s, c]`` (any strides) -> ``[b, s, c]`` contiguous; ``weight`` is conv1d's ``[c, 1, K]``.

    Sums in float32 at least (bf16/fp16 inputs give a float32 result), as the
    fused GPU kernel accumulates.
    """
    taps = weight.shape[-1]
    per_tap = _taps(weight, x.dtype)  # [K, c]
    if bias is None:
        out = torch.mul(x, per_tap[taps - 1])
    else:  # bias and the current tap in one pass
        out = torch.addcmul(bias.to(per_tap.dtype), x, per_tap[taps - 1])
    for k in range(taps - 1):
        back = taps - 1 - k
        if back < x.shape[1]:
            out[:, back:].addcmul_(x[:, :-back], per_tap[k])
    return out


def causal_conv_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, has_bias: bool,
                         grad_x_out: Optional[torch.Tensor] = None
                         ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(grad_x, grad_weight, grad_bias)`` for ``grad`` = dL/d(output) ``[b, s, c]``.

    ``grad_x_out`` (optional, ``[b, s, c]``, any strides) receives ``grad_x``, so a
    caller assembling a larger gradient tensor avoids a copy.
    """
    taps = weight.shape[-1]
    per_tap = _taps(weight, grad.dtype)
    direct = grad_x_out is not None and grad_x_out.dtype == per_tap.dtype
    grad_x = torch.mul(grad, per_tap[taps - 1], out=grad_x_out) if direct else grad * per_tap[taps - 1]
    grad_w = torch.empty_like(per_tap)
    grad_w[taps - 1] = (grad * x).sum((0, 1), dtype=per_tap.dtype)
    for k in range(taps - 1):
        back = taps - 1 - k
        if back >= x.shape[1]:
            grad_w[k] = 0
            continue
        grad_x[:, :-back].addcmul_(grad[:, back:], per_tap[k])
        grad_w[k] = (grad[:, back:] * x[:, :-back]).sum((0, 1), dtype=per_tap.dtype)
    grad_b = grad.sum((0, 1), dtype=per_tap.dtype).to(weight.dtype) if has_bias else None
    if grad_x_out is not None and not direct:
        grad_x = grad_x_out.copy_(grad_x)
    return grad_x, grad_w.t().reshape(weight.shape).to(weight.dtype), grad_b


def _taps(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """conv1d's ``[c, 1, K]`` weight as ``[K, c]`` rows, in at least float32, each row contiguous: a
    strided row (a plain transposed view) keeps the multiply-adds off their vectorised path (3x slower)."""
    taps = weight.reshape(weight.shape[0], weight.shape[-1]).t()
    return taps.to(torch.promote_types(dtype, torch.float32)).contiguous()
