"""Mixture-of-Experts forward bookkeeping for the GPT family.

megatron folds the MoE auxiliary losses' gradient into the backward pass of
the main loss (``MoEAuxLossAutoScaler``) and multiplies it by a process-wide
scale that its pipeline schedules set before each forward (1 / micro-batches).
A forward outside a schedule (``builder.forward_step`` then
``loss.mean().backward()``) would inherit whatever a previous schedule left
there; :func:`prepare_forward` resets it to 1 first, as :mod:`plugtron_gpt.mtp`
does for the MTP loss (a schedule still sets its own value afterwards).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler


def prepare_forward() -> None:
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
