"""Hand-written backward of the chunked SSD scan (:func:`.ssd.ssd_chunked`).

Why by hand: autograd through the chunked scan keeps a dozen chunk-sized
intermediates and replays every broadcast and layout copy of the forward. The
scan's gradient has a compact form, derived term by term from the forward
(``cs`` is the chunk-local cumulative log-decay, ``W_ij = exp(cs_i - cs_j) C_i.B_j``
for ``j <= i``, ``E`` the state entering a chunk, ``S`` the state a chunk makes
from zero):

* in-chunk output ``y_i = sum_j W_ij x_dt_j``:
  ``dW = dy x_dt^T``, ``dx_dt += W^T dy``, ``dcs_i += sum_j (dW*W)_ij``,
  ``dcs_j -= sum_i (dW*W)_ij``, and ``d(C.B)`` is ``dW * exp(..)`` summed over the
  heads sharing a group, giving ``dC = d(CB) B`` and ``dB = d(CB)^T C``. The two
  ``cs`` sums never need ``dW * W``: a row sum is ``dy_i . y_i`` and a column sum
  is ``x_dt_j . (W^T dy)_j``, dot products over the head dim;
* entering states ``y_i += exp(cs_i) E C_i``:
  ``dE = (exp(cs) dy)^T C``, ``dC += (exp(cs) dy) E`` and ``dcs_i += dy_i . y_inter_i``,
  which joins the in-chunk row sum as ``dy_i . y_i`` over the scan output without D;
* the hand-over ``E_{z+1} = a_z E_z + S_z`` runs backwards (:mod:`.recurrence`),
  with ``a_z = exp(cs_end)``;
* chunk states ``S = sum_j exp(cs_end - cs_j) x_dt_j B_j^T``: ``dB_j``,
  ``dx_dt_j`` and the two ``cs`` terms of the decay;
* finally ``cs`` is a cumulative sum of ``dt * A`` (its gradient is a reversed
  cumulative sum) and ``x_dt = x * dt``.

What the forward already computed and the backward needs again (the entering
states, their output, the in-chunk decays and weights, the decayed inputs) is
kept in :class:`~.ssd.ScanSaved` rather than recomputed: time over memory, which
stays below transformers' own path (see the benchmark). Tests compare every
gradient with autograd through the step-by-step recurrence in float64.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from .recurrence import recurrence_backward

if TYPE_CHECKING:
    from .ssd import Chunked, ScanSaved

__all__ = ["ScanGrads", "scan_backward"]


class ScanGrads(NamedTuple):
    """Gradients in the compute dtype, trimmed to the unpadded length."""

    x: torch.Tensor  # [b, l, h, p]
    dt: torch.Tensor  # [b, l, h]
    A: torch.Tensor  # [h]
    B: torch.Tensor  # [b, l, g, n]
    C: torch.Tensor
    D: Optional[torch.Tensor]  # D's shape, or None without D
    initial: torch.Tensor  # [b, h, p, n]


def scan_backward(ch: "Chunked", D: Optional[torch.Tensor], saved: "ScanSaved", dy: torch.Tensor,
                  dfinal: Optional[torch.Tensor], into: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
                  ) -> ScanGrads:
    """All input gradients of the scan, given ``dy`` ``[b, l, h, p]`` and ``dfinal`` ``[b, h, p, n]``.

    ``into``: optional ``(x, B, C)``-shaped tensors (any strides) that receive the
    gradients of x, B and C, so a caller packing them side by side needs no concatenation.
    """
    b, c, q, h = ch.cs.shape
    p, g, n = ch.x_dt.shape[-1], ch.Bc.shape[2], ch.Bc.shape[-1]
    l, big = ch.length, c * q
    dy = dy.to(ch.x.dtype)
    dy5 = F.pad(dy, (0, 0, 0, 0, 0, big - l)).view(b, c, q, h, p) if big > l else dy.reshape(b, c, q, h, p)

    entering = saved.entering
    d_entering, dC = _from_entering_states_grad(ch.cs, entering, ch.Cc, dy5, g)
    across = torch.exp(ch.cs[:, :, -1, :]).to(entering.dtype).unsqueeze(-1)  # [b, c, h, 1]
    final_grad = entering.new_zeros(b, h, p * n) if dfinal is None else dfinal.to(entering.dtype).reshape(b, h, p * n)
    d_across, d_states, d_initial = recurrence_backward(across, entering, d_entering, final_grad)

    dx_dt, dB, dcs = _chunk_states_grad(ch.cs, saved.x_to_end, ch.Bc, d_states, g)
    dcs[:, :, -1, :] += (d_across * across).squeeze(-1)
    dx_dt_in, dB_in, dC_in = _within_chunks_grad(saved, ch.Bc, ch.Cc, dy5, g)
    # The output's own cs terms, rows and columns of dW * W contracted early (see the module docstring).
    dcs += (dy5 * saved.y_scan).sum(-1)
    dcs -= (ch.x_dt * dx_dt_in).sum(-1)
    dx_dt += dx_dt_in
    dB += dB_in
    dC += dC_in

    # cs = cumsum(dt * A) inside each chunk: its adjoint is the reversed cumulative sum.
    d_dtA = (dcs.sum(2, keepdim=True) - dcs.cumsum(2) + dcs).reshape(b, big, h)
    dx_dt = dx_dt.reshape(b, big, h, p)
    ddt = torch.addcmul((dx_dt * ch.x).sum(-1), d_dtA, ch.A)
    dA = (d_dtA * ch.dt).sum((0, 1))
    dx = (dx_dt * ch.dt.unsqueeze(-1))[:, :l]
    dD = None
    if D is not None:
        x = ch.x[:, :l]
        D = D.to(dx.dtype)
        dx = torch.addcmul(dx, dy, D[:, None] if D.dim() == 1 else D, out=None if into is None else into[0])
        dD = (dy * x).sum((0, 1)) if D.dim() == 2 else (dy * x).sum((0, 1, 3))
    elif into is not None:
        dx = into[0].copy_(dx)
    dB, dC = (t.transpose(2, 3).reshape(b, big, g, n)[:, :l] for t in (dB, dC))
    if into is not None:
        dB, dC = into[1].copy_(dB), into[2].copy_(dC)
    return ScanGrads(dx, ddt[:, :l], dA, dB, dC, dD, d_initial.view(b, h, p, n))


def _from_entering_states_grad(cs: torch.Tensor, entering: torch.Tensor, Cc: torch.Tensor, dy: torch.Tensor, g: int
                               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Adjoint of ``y_i += exp(cs_i) E C_i`` in ``E`` and ``C``: ``(dE [b, c, h, p*n], dC [b, c, g, q, n])``
    (its ``cs`` term is added with the in-chunk one, in :func:`scan_backward`)."""
    b, c, q, h = cs.shape
    p, n = dy.shape[-1], Cc.shape[-1]
    r = h // g
    du = (dy * torch.exp(cs).to(dy.dtype).unsqueeze(-1)).view(b, c, q, g, r * p).transpose(2, 3)
    state = entering.view(b, c, g, r * p, n)
    d_entering = torch.matmul(du.transpose(-1, -2), Cc).view(b, c, h, p * n)
    dC = torch.matmul(du, state)
    return d_entering, dC


def _chunk_states_grad(cs: torch.Tensor, weighted: torch.Tensor, Bc: torch.Tensor, d_states: torch.Tensor, g: int
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adjoint of ``S = sum_j exp(cs_end - cs_j) x_dt_j B_j^T``: ``(dx_dt, dB, dcs)``."""
    b, c, q, h = cs.shape
    p, n = weighted.shape[-1], Bc.shape[-1]
    r = h // g
    to_end = torch.exp(cs[:, :, -1:] - cs).to(weighted.dtype).unsqueeze(-1)  # [b, c, q, h, 1]
    dS = d_states.view(b, c, g, r * p, n)
    dB = torch.matmul(weighted.view(b, c, q, g, r * p).transpose(2, 3), dS)  # [b, c, g, q, n]
    d_weighted = torch.matmul(Bc, dS.transpose(-1, -2)).transpose(2, 3).reshape(b, c, q, h, p)
    dx_dt = d_weighted * to_end
    d_decay = (d_weighted * weighted).sum(-1)  # d(to_end) * to_end (weighted = x_dt * to_end), [b, c, q, h]
    dcs = -d_decay
    dcs[:, :, -1] += d_decay.sum(2)
    return dx_dt, dB, dcs


def _within_chunks_grad(saved: "ScanSaved", Bc: torch.Tensor, Cc: torch.Tensor, dy: torch.Tensor, g: int
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adjoint of ``y_i = sum_{j<=i} exp(cs_i - cs_j) (C_i.B_j) x_dt_j`` in x_dt, B and C:
    ``(dx_dt, dB, dC)`` (its ``cs`` terms are contracted in :func:`scan_backward`)."""
    b, c, h, q, _ = saved.decay.shape
    r = h // g
    dy_h = dy.permute(0, 1, 3, 2, 4).contiguous()  # [b, c, h, q, p], copied once for both products
    dx_dt = torch.matmul(saved.weights.transpose(-1, -2), dy_h).permute(0, 1, 3, 2, 4)
    d_weights = torch.matmul(dy_h, saved.x_heads.transpose(-1, -2))  # [b, c, h, q(i), q(j)]
    d_scores = d_weights.mul_(saved.decay).view(b, c, g, r, q, q).sum(3).tril_()  # sum over a group's heads
    dC = torch.matmul(d_scores, Bc)
    dB = torch.matmul(d_scores.transpose(-1, -2), Cc)
    return dx_dt, dB, dC
