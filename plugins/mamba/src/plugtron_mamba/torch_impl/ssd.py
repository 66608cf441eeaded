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
"attention" product (quadratic in the chunk length, but a few large einsums), and
chunks talk to each other only through the state at chunk boundaries.  Every
chunk is processed at once, so there is no Python loop over time.

``ssd_sequential_reference`` is the literal step-by-step recurrence.  It is slow
and exists to pin down the semantics in tests.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = ["segment_sum", "ssd_chunked", "ssd_sequential_reference"]

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


def segment_sum(a: torch.Tensor) -> torch.Tensor:
    """Pairwise segment sums ``out[..., i, j] = a[..., j+1] + ... + a[..., i]``.

    Entries with ``i < j`` (the future) are set to ``-inf`` so that ``exp`` of the
    result is exactly the causal decay matrix, with zeros above the diagonal.

    Why not ``cumsum(a)[i] - cumsum(a)[j]``: for long chunks the two cumulative sums
    are large and nearly equal, so their difference loses precision, and unmasked
    positive differences can overflow in ``exp``.  Instead every column ``j`` gets its
    own cumulative sum that starts after ``j``; the sum never includes terms that
    would later cancel, and masking happens *before* the exponential.
    """
    q = a.shape[-1]
    # grid[..., i, j] = a[..., i]
    grid = a.unsqueeze(-1).expand(*a.shape, q)
    strictly_lower = torch.ones(q, q, dtype=torch.bool, device=a.device).tril(-1)
    grid = grid.masked_fill(~strictly_lower, 0.0)
    sums = grid.cumsum(dim=-2)
    causal = torch.ones(q, q, dtype=torch.bool, device=a.device).tril(0)
    return sums.masked_fill(~causal, float("-inf"))


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
        chunk_size: chunk length; ``l`` need not be a multiple of it.
        D: optional skip weight, ``[h]`` or ``[h, p]``.
        initial_states: optional state before the first step, ``[b, h, p, n]``.
        return_final_states: also return the state after the last step.

    Returns:
        ``y`` of shape ``[b, l, h, p]`` in ``x.dtype``; with ``return_final_states``
        the tuple ``(y, final_states)`` where ``final_states`` is ``[b, h, p, n]``
        in the compute dtype (float32, or float64 for float64 inputs), because the
        state is the quantity that accumulates rounding error.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    b, l, h, p, g, n = _check_shapes(x, dt, A, B, C, D, initial_states)
    r = h // g  # heads per group
    q = chunk_size
    cdt = torch.promote_types(x.dtype, torch.float32)

    # Zero padding is harmless: dt = 0 means no decay (exp(0) = 1) and no input
    # (dt * x = 0), so the padded tail neither changes outputs nor the final state.
    pad = (-l) % q
    nc = (l + pad) // q
    xs = F.pad(x.to(cdt), (0, 0, 0, 0, 0, pad))
    dts = F.pad(dt.to(cdt), (0, 0, 0, pad))
    Bs = F.pad(B.to(cdt), (0, 0, 0, 0, 0, pad))
    Cs = F.pad(C.to(cdt), (0, 0, 0, 0, 0, pad))

    # Split time into (chunk, position) and heads into (group, head-in-group) so
    # that B and C never need to be repeated per head.
    xs = xs.reshape(b, nc, q, g, r, p)
    Bs = Bs.reshape(b, nc, q, g, n)
    Cs = Cs.reshape(b, nc, q, g, n)
    dts = dts.reshape(b, nc, q, g, r)
    x_dt = xs * dts.unsqueeze(-1)  # discretised input, [b, c, q, g, r, p]

    # Log-decays per step, laid out [b, g, r, c, q] so the time axis is last.
    a = (dts * A.to(cdt).reshape(g, r)).permute(0, 3, 4, 1, 2)
    seg = segment_sum(a)  # [b, g, r, c, q(i), q(j)]
    decay_in = torch.exp(seg)  # decay from step j to step i inside a chunk
    decay_from_start = torch.exp(a.cumsum(dim=-1))  # chunk start -> step i (inclusive)
    decay_to_end = decay_in[..., -1, :]  # step j -> chunk end

    # 1) Within-chunk contribution: y_i = sum_{j<=i} (C_i . B_j) decay(j->i) dt_j x_j.
    scores = torch.einsum("bcign,bcjgn->bcgij", Cs, Bs)
    weights = scores.unsqueeze(3) * decay_in.permute(0, 3, 1, 2, 4, 5)  # [b, c, g, r, i, j]
    y = torch.einsum("bcgrij,bcjgrp->bcigrp", weights, x_dt)

    # 2) State each chunk produces by itself (starting from zero).
    chunk_states = torch.einsum(
        "bcjgn,bgrcj,bcjgrp->bcgrpn", Bs, decay_to_end, x_dt
    )  # [b, c, g, r, p, n]

    # 3) Pass states across chunks.  Treat the initial state as chunk "-1"; the
    #    state entering chunk c is a decay-weighted sum of all earlier chunk states,
    #    which is again a (tiny) causal segment-sum product over the chunk axis.
    if initial_states is None:
        init = x_dt.new_zeros(b, 1, g, r, p, n)
    else:
        init = initial_states.to(cdt).reshape(b, 1, g, r, p, n)
    all_states = torch.cat([init, chunk_states], dim=1)  # [b, c+1, ...]
    chunk_totals = F.pad(a.sum(dim=-1), (1, 0))  # [b, g, r, c+1], entry 0 is "no decay"
    decay_chunks = torch.exp(segment_sum(chunk_totals))  # [b, g, r, c+1, c+1]
    boundary = torch.einsum("bgrzs,bsgrpn->bzgrpn", decay_chunks, all_states)
    start_states, final_states = boundary[:, :-1], boundary[:, -1]

    # 4) Contribution of the state entering each chunk: y_i += decay(start->i) C_i h_start.
    y = y + torch.einsum(
        "bcign,bcgrpn,bgrci->bcigrp", Cs, start_states, decay_from_start
    )

    y = y.reshape(b, nc * q, h, p)[:, :l]
    if D is not None:
        y = y + _skip_connection(x.to(cdt), D.to(cdt))
    y = y.to(x.dtype)
    if return_final_states:
        return y, final_states.reshape(b, h, p, n)
    return y


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
