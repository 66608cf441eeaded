"""CPU-capable stand-ins for the transformer-engine modules of megatron's Mamba spec.

megatron's ``mamba_stack_spec`` fuses each layer's input norm into the first
projection (``TELayerNormColumnParallelLinear``), so a megatron MambaModel has
no separate norm modules: the norm weight is ``mixer.in_proj.layer_norm_weight``
(Mamba layers), ``self_attention.linear_qkv.layer_norm_weight`` (attention) and
``mlp.linear_fc1.layer_norm_weight`` (MLP), plus ``decoder.final_norm.weight``
from ``TENorm``. The modules here compute the same functions in plain PyTorch
with the same parameter names, so a state dict moves between the two specs
without renaming.

The fused linear's class name avoids the word "norm" on purpose: the core's
meta-device initialisation (``plugtron.pipeline.materialize.megatron_default_init``)
fills every parameter of a module whose type name contains "norm" with ones,
which would turn the projection weight into a matrix of ones.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from megatron.core.tensor_parallel import ColumnParallelLinear


def normalize(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], config: Any) -> torch.Tensor:
    """LayerNorm or RMSNorm over the last dimension, as TE's norms compute it.

    With ``layernorm_zero_centered_gamma`` the stored weight is ``gamma - 1``
    (TE's convention), so a freshly zeroed weight is the identity scale.
    The statistics are taken in float32 and the result returns in ``x.dtype``.
    """
    gamma = weight.float() + 1.0 if config.layernorm_zero_centered_gamma else weight.float()
    eps = config.layernorm_epsilon
    h = x.float()
    if config.normalization == "RMSNorm":
        out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * gamma
    else:
        out = F.layer_norm(h, h.shape[-1:], gamma, None if bias is None else bias.float(), eps)
    return out.to(x.dtype)


def _norm_parameters(module: torch.nn.Module, prefix: str, hidden: int, config: Any) -> None:
    """Register ``{prefix}weight`` (and ``{prefix}bias`` for LayerNorm) initialised as TE does."""
    fill = 0.0 if config.layernorm_zero_centered_gamma else 1.0
    # as megatron's linears: no explicit device under CPU initialisation (so a meta build stays meta)
    gpu = not config.use_cpu_initialization and torch.cuda.is_available()
    kwargs = dict(dtype=config.params_dtype, device=torch.cuda.current_device() if gpu else None)
    weight = torch.nn.Parameter(torch.empty(hidden, **kwargs).fill_(fill))
    setattr(module, f"{prefix}weight", weight)
    params = [weight]
    if config.normalization == "LayerNorm":
        bias = torch.nn.Parameter(torch.zeros(hidden, **kwargs))
        setattr(module, f"{prefix}bias", bias)
        params.append(bias)
    for param in params:  # replicated over TP; with sequence parallelism its grad is all-reduced
        param.sequence_parallel = bool(config.sequence_parallel)


class ColumnParallelLinearWithLN(ColumnParallelLinear):
    """``ColumnParallelLinear`` whose input first goes through a LayerNorm/RMSNorm.

    Same parameters and function as transformer-engine's
    ``TELayerNormColumnParallelLinear`` in megatron's specs: ``weight`` (and
    ``bias``) of the projection, ``layer_norm_weight`` (and ``layer_norm_bias``
    for LayerNorm) of the norm. With sequence parallelism the norm runs on the
    local sequence shard before the projection gathers it, as in TE.
    """

    def __init__(self, input_size: int, output_size: int, *, config: Any, **kwargs: Any) -> None:
        super().__init__(input_size, output_size, config=config, **kwargs)
        _norm_parameters(self, "layer_norm_", input_size, config)

    def forward(self, input_: torch.Tensor, weight: Optional[torch.Tensor] = None, runtime_gather_output: Optional[bool] = None) -> Any:
        normed = normalize(input_, self.layer_norm_weight, getattr(self, "layer_norm_bias", None), self.config)
        return super().forward(normed, weight=weight, runtime_gather_output=runtime_gather_output)


class TorchFinalNorm(torch.nn.Module):
    """The stack's final LayerNorm/RMSNorm (``weight``, ``bias`` for LayerNorm), like ``TENorm``.

    megatron's own torch norm wrapper refuses zero-centred gamma and sequence
    parallelism; TE's norm supports both, and so does this one.
    """

    def __init__(self, config: Any, hidden_size: int) -> None:
        super().__init__()
        self.config = config
        _norm_parameters(self, "", hidden_size, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x, self.weight, getattr(self, "bias", None), self.config)
