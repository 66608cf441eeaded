"""Gated, grouped RMSNorm used at the output of the Mamba-2 mixer.

megatron-core's ``MambaMixer`` normalises the scan output with ``mamba_ssm``'s
Triton ``RMSNorm`` (wrapped as ``ExtendedRMSNorm``), which cannot be imported
without Triton.  This module reproduces its semantics in plain PyTorch and keeps
the same state-dict surface: a single ``weight`` parameter and no bias entry.

Semantics (``mamba_ssm.ops.triton.layernorm_gated.rms_norm_ref``):

* ``norm_before_gate=False`` (the only mode megatron allows):
  ``y = rmsnorm_per_group(x * silu(z)) * weight``
* ``norm_before_gate=True``: ``y = rmsnorm_per_group(x) * weight * silu(z)``

"Per group" means the last dimension is cut into contiguous blocks of
``group_size`` channels and each block is normalised by its own RMS.  Mamba-2
uses ``group_size = d_inner / ngroups``, so normalisation never mixes channels
belonging to different B/C groups; this is also what keeps the result identical
when groups are split across tensor-parallel ranks.  The arithmetic runs in
at least float32 (as the Triton kernel does) and the result is cast back to ``x.dtype``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GatedRMSNorm", "NormSaved", "gated_rms_norm", "gated_rms_norm_backward", "gated_rms_norm_forward"]


def gated_rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    z: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    group_size: Optional[int] = None,
    norm_before_gate: bool = False,
) -> torch.Tensor:
    """Functional form of :class:`GatedRMSNorm` (see the module docstring)."""
    hidden = x.shape[-1]
    group_size = hidden if group_size is None else group_size
    if hidden % group_size != 0:
        raise ValueError(f"last dim {hidden} is not divisible by group_size {group_size}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"gate z must match x: {tuple(z.shape)} vs {tuple(x.shape)}")

    cdt = torch.promote_types(x.dtype, torch.float32)
    h = x.to(cdt)
    gate = F.silu(z.to(cdt)) if z is not None else None
    if gate is not None and not norm_before_gate:
        h = h * gate
    grouped = h.reshape(*h.shape[:-1], hidden // group_size, group_size)
    inv_rms = torch.rsqrt(grouped.pow(2).mean(dim=-1, keepdim=True) + eps)
    out = (grouped * inv_rms).reshape(h.shape) * weight.to(cdt)
    if gate is not None and norm_before_gate:
        out = out * gate
    return out.to(x.dtype)


class NormSaved(NamedTuple):
    """What :func:`gated_rms_norm_backward` needs from the forward."""

    gate: torch.Tensor  # silu(z), [..., hidden]
    normed: torch.Tensor  # (x * gate) * rstd, [..., groups, group_size]
    rstd: torch.Tensor  # [..., groups, 1]


def gated_rms_norm_forward(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int
                           ) -> Tuple[torch.Tensor, NormSaved]:
    """``rmsnorm_per_group(x * silu(z)) * weight`` (gate before norm, the mixer's only mode),
    without a graph: ``(out, saved)`` in at least float32, for :func:`gated_rms_norm_backward`."""
    cdt = torch.promote_types(x.dtype, torch.float32)
    gate = F.silu(z.to(cdt))
    gated = (x.to(cdt) * gate).unflatten(-1, (-1, group_size))
    rstd = torch.rsqrt(gated.square().mean(-1, keepdim=True) + eps)
    normed = gated.mul_(rstd)
    return normed.flatten(-2) * weight.to(cdt), NormSaved(gate, normed, rstd)


def gated_rms_norm_backward(grad: torch.Tensor, x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor,
                            saved: NormSaved, grad_z_out: Optional[torch.Tensor] = None
                            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_z, grad_weight)`` of :func:`gated_rms_norm_forward`, in the compute dtype.

    ``grad_z_out``: optional tensor (any strides, the compute dtype) that receives ``grad_z``,
    so a caller packing gradients side by side needs no copy.

    With ``h = x * silu(z)`` and ``n = h * rstd`` per group: ``dn = grad * weight``,
    ``dh = rstd * (dn - n * mean(dn * n))``, ``dx = dh * silu(z)``,
    ``dz = dh * x * silu'(z)``.
    """
    gate, normed, rstd = saved
    cdt, group_size = rstd.dtype, normed.shape[-1]
    grad = grad.to(cdt)
    grad_weight = (grad.flatten(0, -2) * normed.flatten(-2).flatten(0, -2)).sum(0)
    d_normed = (grad * weight.to(cdt)).unflatten(-1, normed.shape[-2:])
    # mean(dn * n) per group, contracted without a product-sized temporary
    inner = torch.einsum("...gk,...gk->...g", d_normed, normed).unsqueeze(-1)
    d_gated = torch.addcmul(d_normed, normed, inner, value=-1.0 / group_size).mul_(rstd).flatten(-2)
    silu_grad = torch.ops.aten.silu_backward
    gated_grad, z = d_gated * x.to(cdt), z.to(cdt)
    grad_z = silu_grad(gated_grad, z) if grad_z_out is None else silu_grad.grad_input(gated_grad, z, grad_input=grad_z_out)
    return d_gated.mul_(gate), grad_z, grad_weight.to(weight.dtype)


class GatedRMSNorm(nn.Module):
    """RMSNorm with an optional SiLU gate and per-group statistics.

    Constructor arguments mirror ``mamba_ssm``'s ``RMSNorm`` (which megatron
    builds with ``eps=1e-5`` and ``group_size=d_inner_local // ngroups_local``) so
    it is a drop-in replacement, including ``device``/``dtype`` factory kwargs.
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-5,
        group_size: Optional[int] = None,
        norm_before_gate: bool = False,
        device: Optional[torch.device | str | int] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        group_size = hidden_size if group_size is None else group_size
        if group_size <= 0 or hidden_size % group_size != 0:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be a positive multiple of group_size "
                f"({group_size})"
            )
        self.hidden_size = hidden_size
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        # Registered as None so that, like mamba_ssm's RMSNorm, there is no bias key
        # in the state dict but ``module.bias`` exists.
        self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise the scale to ones, as mamba_ssm does."""
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, z: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Normalise ``x`` (optionally gated by ``z``) over groups of the last dim."""
        return gated_rms_norm(
            x,
            self.weight,
            z=z,
            eps=self.eps,
            group_size=self.group_size,
            norm_before_gate=self.norm_before_gate,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.hidden_size}, eps={self.eps}, group_size={self.group_size}, "
            f"norm_before_gate={self.norm_before_gate}"
        )
