"""Activation functions plugtron provides for configs to name by import path.

Configs store the activation as a ``"module:function"`` string so they stay
plain data (YAML/JSON); this module holds the ones torch does not expose as a
one-argument function. Every function here is on the core allowlist
(:data:`plugtron.config._codec.ACTIVATIONS`), so any family and converter can
use it without declaring it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation.

    GPT-2's ``gelu_new`` and HF's ``gelu_pytorch_tanh`` are this function;
    exact ``torch.nn.functional.gelu`` differs from it by up to ~1e-3, which is
    enough to break logit parity, hence a dedicated entry point.
    """
    return F.gelu(x, approximate="tanh")
