"""Mamba-2 state-space-duality (SSD) scan in plain PyTorch.

The fused Triton kernels that megatron-core uses for Mamba-2 are unavailable on
machines without a GPU (and without ``mamba_ssm``).  This module provides the same
computation in ordinary tensor operations so the mixer can run, be tested and be
differentiated anywhere.

The recurrence being computed, per batch element and head, is::

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t B_t^T        (h_t: [headdim, d_state])
    y_t = h_t C_t + D * x_t

``ssd_chunked`` evaluates it the SSD way: the sequence is cut into chunks of
``chunk_size`` steps; inside a chunk the output is a masked, decay-weighted
"attention" product (quadratic in the chunk length, but a few batched matmuls), and
chunks talk to each other only through the state at chunk boundaries.  Every
chunk is processed at once; the only loop is the short one over chunks that hands
the state on (:mod:`.recurrence`), never one over time steps. The pieces are
public to the package: :class:`Chunked` (inputs in chunk layouts),
:func:`scan_forward` (no graph; returns what the backward reuses as
:class:`ScanSaved`) and :func:`.ssd_grad.scan_backward`, so the mixer's fused
function (:mod:`.inner`) can run them inside its own autograd function.

``ssd_sequential_reference`` is the literal step-by-step recurrence.  It is slow
and exists to pin down the semantics in tests.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .recurrence import recurrence_forward
from .ssd_grad import scan_backward

__all__ = ["Chunked", "ScanSaved", "scan_forward", "ssd_chunked", "ssd_sequential_reference"]

SSDResult = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


def _check_shapes(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    initial_states: Optional[torch.Tensor],
) -> Tuple[int, int, int, int, int, int]:
    """Validate the argument shapes once, so errors name the offending tensor."""
    if x.dim() != 4:
        raise ValueError(f"x must be [batch, seqlen, nheads, headdim], got {tuple(x.shape)}")
    b, l, h, p = x.shape
    if dt.shape != (b, l, h):
        raise ValueError(f"dt must have shape {(b, l, h)}, got {tuple(dt.shape)}")
    if A.shape != (h,):
        raise ValueError(f"A must have shape {(h,)}, got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (b, l) or B.shape != C.shape:
        raise ValueError(
            f"B and C must both be [batch, seqlen, ngroups, d_state] with batch={b}, "
            f"seqlen={l}; got {tuple(B.shape)} and {tuple(C.shape)}"
        )
    g, n = B.shape[2], B.shape[3]
    if h % g != 0:
        raise ValueError(f"nheads ({h}) must be divisible by ngroups ({g})")
    if D is not None and D.shape not in ((h,), (h, p)):
        raise ValueError(f"D must have shape {(h,)} or {(h, p)}, got {tuple(D.shape)}")
    if initial_states is not None and initial_states.shape != (b, h, p, n):
        raise ValueError(
            f"initial_states must have shape {(b, h, p, n)}, got {tuple(initial_states.shape)}"
        )
    return b, l, h, p, g, n


def _skip_connection(x: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """D * x with D either per head ([h]) or per channel ([h, p])."""
    if D.dim() == 1:
        return x * D[:, None]
    return x * D


class Chunked(NamedTuple):
    """The scan's inputs in the compute dtype (``cs`` in float64), zero-padded to whole chunks,
    in chunk layouts.

    Zero padding is harmless: dt = 0 means no decay (exp(0) = 1) and no input
    (dt * x = 0), so the padded tail changes neither outputs nor the final state.
    """

    x: torch.Tensor  # [b, L, h, p]  (L = c * q, padded)
    dt: torch.Tensor  # [b, L, h]
    A: torch.Tensor  # [h]
    cs: torch.Tensor  # [b, c, q, h] log-decay since chunk start (cumulative), float64 (see of())
    x_dt: torch.Tensor  # [b, c, q, h, p] discretised input (a view of heads-first memory)
    Bc: torch.Tensor  # [b, c, g, q, n] (a transposed view)
    Cc: torch.Tensor  # [b, c, g, q, n]
    length: int  # l, before padding

    @classmethod
    def of(cls, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, q: int
           ) -> "Chunked":
        b, l, h, p = x.shape
        g, n = B.shape[2], B.shape[3]
        cdt = torch.promote_types(x.dtype, torch.float32)
        x, dt, A, B, C = (t.to(cdt) for t in (x, dt, A, B, C))
        pad = (-l) % q
        if pad:
            x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
            dt = F.pad(dt, (0, 0, 0, pad))
        c = (l + pad) // q
        # cs stays in float64: it reaches hundreds within a chunk and every decay is a difference
        # of two of its values, so float32 storage would put |cs| * 2^-24 of error into each
        # exponent (measured: 3x transformers' float32 error at the mamba2-1.3b shape). [b, L, h].
        cs = (dt.double() * A.double()).view(b, c, q, h).cumsum(2)
        # x_dt is stored heads-first ([b, c, h, q, p] memory, seen as [b, c, q, h, p]): the in-chunk
        # matmul wants that layout, and writing it here costs nothing, where a later copy would.
        x_dt = x.new_empty(b, c, h, q, p).transpose(2, 3)
        torch.mul(x.view(b, c, q, h, p), dt.view(b, c, q, h, 1), out=x_dt)
        Bc = B.view(b, c, q, g, n).transpose(2, 3)
        Cc = C.view(b, c, q, g, n).transpose(2, 3)
        return cls(x, dt, A, cs, x_dt, Bc, Cc, l)


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: Optional[torch.Tensor] = None,
    initial_states: Optional[torch.Tensor] = None,
    return_final_states: bool = False,
) -> SSDResult:
    """Chunked SSD scan (training / prefill form of Mamba-2).

    Args:
        x: inputs ``[b, l, h, p]``.
        dt: step sizes ``[b, l, h]``, already bias-added and softplus'ed.
        A: per-head decay rates ``[h]`` (negative for a stable scan).
        B, C: input/output projections ``[b, l, g, n]``; head ``k`` uses group
            ``k // (h // g)`` (heads of a group are contiguous).
        chunk_size: chunk length; ``l`` need not be a multiple of it. The result
            does not depend on it (up to rounding); it only trades the quadratic
            in-chunk work against the number of chunk states.
        D: optional skip weight, ``[h]`` or ``[h, p]``.
        initial_states: optional state before the first step, ``[b, h, p, n]``.
        return_final_states: also return the state after the last step.

    Returns:
        ``y`` of shape ``[b, l, h, p]`` in ``x.dtype``; with ``return_final_states``
        the tuple ``(y, final_states)`` where ``final_states`` is ``[b, h, p, n]``
        in the compute dtype (float32, or float64 for float64 inputs), because the
        state is the quantity that accumulates rounding error.

    Decays are differences of *chunk-local* cumulative log-decays, masked or
    clamped to be <= 0 before ``exp`` (so nothing overflows however strong the
    decay), the convention of the fused GPU kernels. Each big product is one
    batched matmul on a layout chosen to need few copies; heads of a group share
    one ``C B^T`` product instead of repeating B and C per head. The backward is
    written by hand (:mod:`.ssd_grad`) and reuses what the forward computed
    (:class:`ScanSaved`) instead of replaying autograd's broadcasts and copies.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    b, l, h, p, g, n = _check_shapes(x, dt, A, B, C, D, initial_states)
    if l == 0:  # no steps: nothing out, the state passes through unchanged
        cdt = torch.promote_types(x.dtype, torch.float32)
        final = x.new_zeros(b, h, p, n, dtype=cdt) if initial_states is None else initial_states.to(cdt).clone()
        return (x.new_zeros(x.shape), final) if return_final_states else x.new_zeros(x.shape)
    y, final = _SSDScan.apply(x, dt, A, B, C, D, initial_states, chunk_size)
    return (y, final) if return_final_states else y


_LOG2_E = math.log2(math.e)


class ScanSaved(NamedTuple):
    """What the backward reuses from the forward instead of recomputing it."""

    entering: torch.Tensor  # [b, c, h, p*n] state entering each chunk
    y_scan: torch.Tensor  # [b, c, q, h, p] output before the D skip: in-chunk plus entering-state terms
    decay: torch.Tensor  # [b, c, h, q, q] in-chunk exp(cs_i - cs_j), clamped to <= 1 above the diagonal
    weights: torch.Tensor  # [b, c, h, q, q] decay * (C_i . B_j), causal
    x_heads: torch.Tensor  # [b, c, h, q, p] x_dt, heads before steps (the in-chunk matmul's layout)
    x_to_end: torch.Tensor  # [b, c, q, h, p] x_dt * exp(cs_end - cs), what the chunk states are made of


def scan_forward(ch: Chunked, D: Optional[torch.Tensor], initial: Optional[torch.Tensor]
                 ) -> Tuple[torch.Tensor, torch.Tensor, ScanSaved]:
    """``(y [b, l, h, p], final [b, h, p, n], saved)`` in the compute dtype, no graph."""
    b, c, q, h = ch.cs.shape
    p, g, n = ch.x_dt.shape[-1], ch.Bc.shape[2], ch.Bc.shape[-1]
    cs = ch.cs.transpose(2, 3)  # [b, c, h, q]
    y, decay, weights, x_heads = _within_chunks(cs, ch.x_dt, ch.Bc, ch.Cc, g)  # y: [b, c, g, q, r, p]
    states, x_to_end = _chunk_states(cs, ch.x_dt, ch.Bc, g)  # [b, c, h, p*n], each chunk from a zero state
    across = torch.exp(cs[..., -1:]).to(ch.x_dt.dtype)  # [b, c, h, 1] decay across each chunk
    init = states.new_zeros(b, h, p * n) if initial is None else initial.to(states.dtype).reshape(b, h, p * n)
    entering, final = recurrence_forward(across, states, init)
    y_scan = _add_entering_states(y, cs, entering, ch.Cc, g)
    y = y_scan.view(b, c * q, h, p)[:, : ch.length]
    if D is not None:
        D = D.to(y.dtype)
        y = torch.addcmul(y, ch.x[:, : ch.length], D[:, None] if D.dim() == 1 else D)
    return y, final.reshape(b, h, p, n), ScanSaved(entering, y_scan, decay, weights, x_heads, x_to_end)


class _SSDScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                D: Optional[torch.Tensor], initial: Optional[torch.Tensor], chunk: int
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        y, final, saved = scan_forward(Chunked.of(x, dt, A, B, C, chunk), D, initial)
        ctx.save_for_backward(x, dt, A, B, C, D, *saved)
        ctx.chunk = chunk
        ctx.initial_dtype = None if initial is None else initial.dtype
        return y.to(x.dtype), final

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor, dfinal: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x, dt, A, B, C, D, *saved = ctx.saved_tensors
        grads = scan_backward(Chunked.of(x, dt, A, B, C, ctx.chunk), D, ScanSaved(*saved), dy, dfinal)
        dD, dinit = grads.D, grads.initial
        return (grads.x.to(x.dtype), grads.dt.to(dt.dtype), grads.A.to(A.dtype), grads.B.to(B.dtype),
                grads.C.to(C.dtype), None if D is None else dD.to(D.dtype),
                dinit.to(ctx.initial_dtype) if ctx.needs_input_grad[6] else None, None)


def _within_chunks(cs: torch.Tensor, x_dt: torch.Tensor, Bc: torch.Tensor, Cc: torch.Tensor, g: int
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """y_i = sum_{j<=i} (C_i . B_j) exp(cs_i - cs_j) x_dt_j inside each chunk, as ``[b, c, g, q, r, p]``;
    also the decays, the weights and x_dt heads-first, which the backward reuses."""
    b, c, h, q = cs.shape
    r, p = h // g, x_dt.shape[-1]
    scores = torch.matmul(Cc, Bc.transpose(-1, -2)).tril()  # [b, c, g, q(i), q(j)], causal
    # Above the diagonal cs_i - cs_j >= 0 could overflow exp; clamp to 0 there, the tril'd scores zero it.
    # - Both [b, c, h, q, q] products go into contiguous buffers: left to themselves they would follow
    #   cs's heads-innermost strides, and every matmul on them would first copy them.
    # - Each difference is taken in cs's float64 and rounded once; the tiny cs is made contiguous so
    #   that mixed-dtype pass reads with stride 1 (1.7x faster than through the transposed view).
    # - exp(u) as exp2(u * log2(e)), the difference scaled (not cs, which would round at |cs|'s
    #   scale): torch's float32 exp is about 3x slower than its exp2 on CPU (measured, AVX-512).
    decay, cs = x_dt.new_empty(b, c, h, q, q), cs.contiguous()
    torch.sub(cs.unsqueeze(-1), cs.unsqueeze(-2), out=decay).clamp_(max=0.0).mul_(_LOG2_E).exp2_()
    weights = torch.empty_like(decay)
    torch.mul(decay.view(b, c, g, r, q, q), scores.unsqueeze(3), out=weights.view(b, c, g, r, q, q))
    x_heads = x_dt.transpose(2, 3).contiguous()  # [b, c, h, q, p], already so in memory (see Chunked.of)
    y = torch.matmul(weights, x_heads)
    return y.view(b, c, g, r, q, p).transpose(3, 4), decay, weights, x_heads


def _chunk_states(cs: torch.Tensor, x_dt: torch.Tensor, Bc: torch.Tensor, g: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """State each chunk produces from a zero start: sum_j exp(cs_end - cs_j) x_dt_j B_j^T, ``[b, c, h, p*n]``,
    and the decayed inputs ``x_dt_j exp(cs_end - cs_j)`` ``[b, c, q, h, p]``."""
    b, c, h, q = cs.shape
    p, n = x_dt.shape[-1], Bc.shape[-1]
    to_end = torch.exp(cs[..., -1:] - cs).to(x_dt.dtype).transpose(2, 3).unsqueeze(-1)  # [b, c, q, h, 1]
    weighted = x_dt.new_empty(b, c, q, h, p)  # tokens-first, as the states' matmul wants it
    torch.mul(x_dt, to_end, out=weighted)
    states = torch.matmul(weighted.view(b, c, q, g, (h // g) * p).permute(0, 1, 3, 4, 2), Bc)  # [b, c, g, r*p, n]
    return states.view(b, c, h, p * n), weighted


def _add_entering_states(y_within: torch.Tensor, cs: torch.Tensor, entering: torch.Tensor, Cc: torch.Tensor, g: int
                         ) -> torch.Tensor:
    """``y_within`` (``[b, c, g, q, r, p]``) plus ``exp(cs_i) C_i . h_entering``, in one fused pass
    written tokens-first, ``[b, c, q, h, p]`` (the layout the output is reshaped from)."""
    b, c, h, q = cs.shape
    r, n = h // g, Cc.shape[-1]
    p = entering.shape[-1] // n
    state = entering.view(b, c, g, r * p, n).transpose(-1, -2)  # [b, c, g, n, r*p]: a transposed view, no copy
    from_states = torch.matmul(Cc, state).view(b, c, g, q, r, p)
    scale = torch.exp(cs).to(y_within.dtype).view(b, c, g, r, q).transpose(3, 4).unsqueeze(-1)
    out = from_states.new_empty(b, c, q, g, r, p)
    torch.addcmul(y_within, from_states, scale, out=out.transpose(2, 3))
    return out.view(b, c, q, h, p)


def ssd_sequential_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: Optional[int] = None,
    D: Optional[torch.Tensor] = None,
    initial_states: Optional[torch.Tensor] = None,
    return_final_states: bool = False,
) -> SSDResult:
    """Step-by-step recurrence with the same signature as :func:`ssd_chunked`.

    Written for readability, not speed (a Python loop over time); tests run it in
    float64 as ground truth.  ``chunk_size`` is accepted and ignored so the two
    functions are interchangeable.  Computes in ``x``'s dtype promoted to at least
    float32 and returns ``y`` in ``x.dtype``.
    """
    del chunk_size
    b, l, h, p, g, n = _check_shapes(x, dt, A, B, C, D, initial_states)
    cdt = torch.promote_types(x.dtype, torch.float32)
    heads_per_group = h // g
    # Give each head its own copy of its group's B and C: [b, l, h, n].
    B_h = B.to(cdt).repeat_interleave(heads_per_group, dim=2)
    C_h = C.to(cdt).repeat_interleave(heads_per_group, dim=2)
    xc, dtc, Ac = x.to(cdt), dt.to(cdt), A.to(cdt)

    if initial_states is None:
        state = xc.new_zeros(b, h, p, n)
    else:
        state = initial_states.to(cdt).clone()
    outputs = []
    for t in range(l):
        decay = torch.exp(dtc[:, t] * Ac)  # [b, h]
        # Outer product x_t B_t^T per head, scaled by the step size.
        update = (dtc[:, t, :, None, None] * xc[:, t, :, :, None]) * B_h[:, t, :, None, :]
        state = decay[:, :, None, None] * state + update
        y_t = (state * C_h[:, t, :, None, :]).sum(dim=-1)  # [b, h, p]
        if D is not None:
            y_t = y_t + _skip_connection(xc[:, t], D.to(cdt))
        outputs.append(y_t)
    y = torch.stack(outputs, dim=1) if outputs else xc.new_zeros(b, 0, h, p)
    y = y.to(x.dtype)
    if return_final_states:
        return y, state
    return y
