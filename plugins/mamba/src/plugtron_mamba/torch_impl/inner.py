"""The mixer between its two projections, as one autograd function.

``conv_scan_norm`` maps the input projection's output ``[z | x B C | dt]`` to the
gated, normalised scan output, exactly as the mixer's forward used to do op by
op (causal conv + SiLU on ``x B C``, softplus'ed ``dt``, the SSD scan, the gated
RMSNorm). Why one function with a hand-written backward: autograd through those
ops spent more time on glue than on arithmetic (splitting the projection output
and concatenating its gradient back, transposes around ``F.conv1d``, a dozen
saved intermediates). Here the forward runs without a graph, keeps what the
backward needs (the projection output, the conv pre-activation, the scan's chunked
inputs and :class:`~.ssd.ScanSaved`, the scan output, the norm's
:class:`~.norm.NormSaved`) and the backward writes each gradient straight into
its slice of one ``[z | xBC | dt]`` gradient tensor. Saving rather than
recomputing costs memory (still below transformers' own path, see the benchmark)
and saves time.

It supports first derivatives only. Each piece's backward is tested against
autograd through its plain-op definition, and the whole against the previous
op-by-op mixer.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from .conv import causal_conv_backward, causal_conv_forward
from .norm import NormSaved, gated_rms_norm_backward, gated_rms_norm_forward
from .ssd import Chunked, ScanSaved, scan_forward
from .ssd_grad import ScanGrads, scan_backward

__all__ = ["InnerShape", "conv_scan_norm"]


class InnerShape(NamedTuple):
    """Sizes of one rank's slice, and the settings that are not tensors."""

    nheads: int
    headdim: int
    ngroups: int
    d_state: int
    chunk: int
    norm_eps: float
    norm_group: Optional[int]  # channels per RMSNorm group; None: no norm, output y * silu(z)

    @property
    def d_inner(self) -> int:
        return self.nheads * self.headdim

    @property
    def splits(self) -> Tuple[int, int, int]:
        """Widths of ``z``, ``x B C`` and ``dt`` in the projection output."""
        return self.d_inner, self.d_inner + 2 * self.ngroups * self.d_state, self.nheads

    @property
    def conv_splits(self) -> Tuple[int, int, int]:
        """Widths of ``x``, ``B`` and ``C`` in the conv's channels."""
        return self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state


def conv_scan_norm(zxbcdt: torch.Tensor, conv_weight: torch.Tensor, conv_bias: Optional[torch.Tensor],
                   dt_bias: torch.Tensor, A_log: torch.Tensor, D: torch.Tensor, norm_weight: Optional[torch.Tensor],
                   shape: InnerShape) -> torch.Tensor:
    """``[b, s, z|xBC|dt]`` -> ``[b, s, d_inner]`` in ``zxbcdt``'s dtype (computed in >= float32).

    ``D`` is ``[nheads]`` or ``[nheads * headdim]``; ``norm_weight`` is None exactly
    when ``shape.norm_group`` is None.
    """
    return _ConvScanNorm.apply(zxbcdt, conv_weight, conv_bias, dt_bias, A_log, D, norm_weight, shape)


def _no_autocast(tensor: torch.Tensor) -> Any:
    """The function chooses its own compute dtype (>= float32); autocast would silently run its
    matmuls in bf16/fp16, in the forward and (with a different state) in the backward."""
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def _dt_input(dt_raw: torch.Tensor, dt_bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``dt`` before softplus: the projection's dt columns plus the bias, in the compute dtype."""
    return dt_raw.to(dtype) + dt_bias.to(dtype)


def _scan_inputs(pre: torch.Tensor, dt_raw: torch.Tensor, dt_bias: torch.Tensor, A_log: torch.Tensor,
                 shape: InnerShape) -> Chunked:
    """The scan's chunked inputs from the conv pre-activation (whose dtype is the compute dtype)."""
    b, s, _ = pre.shape
    h, p, g, n = shape.nheads, shape.headdim, shape.ngroups, shape.d_state
    x, B, C = F.silu(pre).split(shape.conv_splits, dim=-1)
    dt = F.softplus(_dt_input(dt_raw, dt_bias, pre.dtype))
    A = -torch.exp(A_log.to(pre.dtype))
    return Chunked.of(x.view(b, s, h, p), dt, A, B.view(b, s, g, n), C.view(b, s, g, n), shape.chunk)


def _skip_weight(D: torch.Tensor, shape: InnerShape, dtype: torch.dtype) -> torch.Tensor:
    """The ``D`` parameter as the scan takes it: ``[h]``, or ``[h, p]`` with ``D_has_hdim``."""
    return (D if D.numel() == shape.nheads else D.view(shape.nheads, shape.headdim)).to(dtype)


class _ConvScanNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, zxbcdt: torch.Tensor, conv_weight: torch.Tensor, conv_bias: Optional[torch.Tensor],
                dt_bias: torch.Tensor, A_log: torch.Tensor, D: torch.Tensor, norm_weight: Optional[torch.Tensor],
                shape: InnerShape) -> torch.Tensor:
        z, xbc, dt_raw = zxbcdt.split(shape.splits, dim=-1)
        with _no_autocast(zxbcdt):
            pre = causal_conv_forward(xbc, conv_weight, conv_bias)
            chunked = _scan_inputs(pre, dt_raw, dt_bias, A_log, shape)
            y, _, saved = scan_forward(chunked, _skip_weight(D, shape, pre.dtype), None)
            y = y.flatten(-2)
            if shape.norm_group is None:
                out, norm_saved = y * F.silu(z.to(y.dtype)), (None, None, None)
            else:
                out, norm_saved = gated_rms_norm_forward(y, z, norm_weight, shape.norm_eps, shape.norm_group)
        ctx.save_for_backward(zxbcdt, conv_weight, dt_bias, A_log, D, norm_weight, pre, y, *norm_saved,
                              *chunked[:-1], *saved)
        ctx.shape, ctx.has_conv_bias, ctx.length = shape, conv_bias is not None, chunked.length
        return out.to(zxbcdt.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        with _no_autocast(grad_out):
            return _ConvScanNorm._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx: Any, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        zxbcdt, conv_weight, dt_bias, A_log, D, norm_weight, pre, y, *rest = ctx.saved_tensors
        fields = len(Chunked._fields) - 1
        norm_saved, chunked = NormSaved(*rest[:3]), Chunked(*rest[3 : 3 + fields], ctx.length)
        shape: InnerShape = ctx.shape
        z, xbc, dt_raw = zxbcdt.split(shape.splits, dim=-1)
        grad_in = torch.empty(zxbcdt.shape, dtype=zxbcdt.dtype, device=zxbcdt.device)
        grad_z, grad_xbc, grad_dt = grad_in.split(shape.splits, dim=-1)

        dy, d_norm = _gate_norm_backward(grad_out.to(y.dtype), y, z, norm_weight, norm_saved, grad_z)
        d_act, grads = _scan_backward_packed(chunked, ScanSaved(*rest[3 + fields :]), D, dy, pre, shape)
        d_pre = torch.ops.aten.silu_backward(d_act, pre)
        _, d_conv_w, d_conv_b = causal_conv_backward(d_pre, xbc, conv_weight, ctx.has_conv_bias, grad_x_out=grad_xbc)
        d_dt_in = grads.dt * torch.sigmoid(_dt_input(dt_raw, dt_bias, pre.dtype))  # softplus' = sigmoid
        grad_dt.copy_(d_dt_in)
        d_dt_bias = d_dt_in.sum((0, 1)).to(dt_bias.dtype)
        d_A_log = (grads.A * chunked.A).to(A_log.dtype)  # A = -exp(A_log): dA/dA_log = A
        d_D = grads.D.reshape(D.shape).to(D.dtype)
        return grad_in, d_conv_w, d_conv_b, d_dt_bias, d_A_log, d_D, d_norm, None


def _gate_norm_backward(grad: torch.Tensor, y: torch.Tensor, z: torch.Tensor, norm_weight: Optional[torch.Tensor],
                        saved: NormSaved, grad_z: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(dy, d_norm_weight)`` of the output stage (gated RMSNorm, or ``y * silu(z)`` without a norm),
    writing z's gradient into ``grad_z`` (directly where its dtype is the compute dtype)."""
    direct = grad_z if grad_z.dtype == y.dtype else None
    if saved.rstd is not None:
        dy, dz, d_norm = gated_rms_norm_backward(grad, y, z, norm_weight, saved, grad_z_out=direct)
    else:
        z = z.to(y.dtype)
        dy, dz, d_norm = grad * F.silu(z), torch.ops.aten.silu_backward(grad * y, z), None
    if dz is not grad_z:
        grad_z.copy_(dz)
    return dy, d_norm


def _scan_backward_packed(chunked: Chunked, saved: ScanSaved, D: torch.Tensor, dy: torch.Tensor, pre: torch.Tensor,
                          shape: InnerShape) -> Tuple[torch.Tensor, ScanGrads]:
    """The scan's gradients, with those of x, B and C written side by side into one ``[b, s, x|B|C]``
    tensor (the layout of the conv output they came from)."""
    b, s, _ = pre.shape
    h, p, g, n = shape.nheads, shape.headdim, shape.ngroups, shape.d_state
    d_act = torch.empty_like(pre)
    d_x, d_B, d_C = d_act.split(shape.conv_splits, dim=-1)
    into = (d_x.view(b, s, h, p), d_B.view(b, s, g, n), d_C.view(b, s, g, n))
    skip = _skip_weight(D, shape, pre.dtype)
    return d_act, scan_backward(chunked, skip, saved, dy.view(b, s, h, p), None, into=into)
