"""The state hand-over between SSD chunks, with a hand-written backward.

After each chunk has computed the state it produces by itself (from a zero
start), the state *entering* chunk z follows the linear recurrence::

    E_0 = initial,    E_{z+1} = a_z * E_z + S_z

with ``a_z`` the decay across chunk z. Written as a causal matrix over chunks
it is one small matmul, but that needs the states heads-first and back again
(two full transposes of the largest tensor of the scan). Here it is a loop
over chunks on contiguous ``[b, h, k]`` slices, in the layout the rest of the
scan uses. Autograd through such a loop records several ops per chunk; the
backward below is the recurrence run in reverse instead::

    G = dL/dE_c;  for z = c-1 .. 0:  dL/dS_z = G,  dL/da_z = <G, E_z>,  G = dL/dE_z + a_z G

It supports first derivatives only (no double backward).
"""

from __future__ import annotations

from typing import Any, Tuple

import torch

__all__ = ["chunk_recurrence", "recurrence_backward", "recurrence_forward"]


def recurrence_forward(decay: torch.Tensor, states: torch.Tensor, initial: torch.Tensor
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(entering, final)`` without recording a graph (see :func:`chunk_recurrence`)."""
    entering = torch.empty_like(states)
    state = initial
    for z in range(states.shape[1]):
        entering[:, z] = state
        state = torch.addcmul(states[:, z], decay[:, z], state)
    return entering, state


def recurrence_backward(decay: torch.Tensor, entering: torch.Tensor, grad_entering: torch.Tensor,
                        grad_final: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_decay, grad_states, grad_initial)``: the recurrence run in reverse."""
    grad_states = torch.empty_like(entering)
    grad_decay = torch.empty_like(decay)
    running = grad_final
    for z in reversed(range(entering.shape[1])):
        grad_states[:, z] = running
        grad_decay[:, z] = (running * entering[:, z]).sum(-1, keepdim=True)
        running = torch.addcmul(grad_entering[:, z], decay[:, z], running)
    return grad_decay, grad_states, running


class _ChunkRecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, decay: torch.Tensor, states: torch.Tensor, initial: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        entering, final = recurrence_forward(decay, states, initial)
        ctx.save_for_backward(decay, entering)
        return entering, final

    @staticmethod
    def backward(ctx: Any, grad_entering: torch.Tensor, grad_final: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        decay, entering = ctx.saved_tensors
        return recurrence_backward(decay, entering, grad_entering, grad_final)


def chunk_recurrence(decay: torch.Tensor, states: torch.Tensor, initial: torch.Tensor | None = None
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """States entering each chunk and the state after the last one.

    Args:
        decay: ``[b, c, h, 1]``, the decay across each chunk (``exp`` of its summed log-decay).
        states: ``[b, c, h, k]``, the state each chunk produces from a zero start.
        initial: ``[b, h, k]`` state before the first chunk, or ``None`` for zeros.

    Returns:
        ``(entering [b, c, h, k], final [b, h, k])``.
    """
    if initial is None:
        initial = states.new_zeros(states[:, 0].shape)
    return _ChunkRecurrence.apply(decay, states.contiguous(), initial.to(states.dtype))
