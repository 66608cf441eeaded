"""The Mamba family's MoE (``E``) layer: megatron's ``MoETransformerLayer`` on local modules.

Parameter names are those of megatron's Mamba spec with SequentialMLP
experts: ``pre_mlp_layernorm.weight``, ``mlp.router.weight``,
``mlp.router.expert_bias``, ``mlp.experts.local_experts.{j}.linear_fc{1,2}.weight``,
``mlp.shared_experts.linear_fc{1,2}.weight``.

* The norm is the core's ``TorchNorm``, which (unlike megatron's torch norm)
  allows the sequence parallelism megatron requires for MoE at TP > 1.
* The MoE CPU fixes (streams, ``te_general_gemm``, split sizes, gloo gathers)
  are the core CPU runtime's (:mod:`plugtron.runtime.cpu`), active for every
  family; nothing is patched here.
* :class:`ParameterBiasRouter`: megatron keeps the aux-loss-free
  ``expert_bias`` as a *buffer*; the HF engine (and the core's sharding and
  checkpoint helpers built on ``named_parameters``) move parameters only, so
  the bias of a converted NemotronH would be left at zero. The router here
  holds the same float32 tensor as a parameter that takes no gradient
  (megatron's optimizer and DDP skip parameters with ``requires_grad=False``;
  the router's own float32 upkeep and bias update work on it unchanged), and it
  stays float32 through dtype casts of the model (as checkpoints store it).

The GPT family builds the same MoE spec (``plugtron_gpt.specs``); plugins do
not import each other, so this module builds it from megatron and the core.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.transformer.moe.router import TopKRouter


class ParameterBiasRouter(TopKRouter):
    """megatron's ``TopKRouter`` with ``expert_bias`` as a no-grad float32 parameter (same name and values)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        bias = self._buffers.pop("expert_bias", None)
        if bias is not None:
            self.expert_bias = torch.nn.Parameter(bias, requires_grad=False)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        """Casts (``Float16Module``'s ``.bfloat16()``) leave the bias in float32, as megatron's router
        keeps it: the engine copies checkpoint values into it directly, so a bf16 round would be lost."""
        out = super()._apply(fn, recurse)
        self._maintain_float32_expert_bias()
        return out


def moe_layer_spec(config: Any) -> Any:
    """``MoETransformerLayer(pre_mlp_layernorm=TorchNorm, mlp=MoELayer)`` with SequentialMLP experts."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import MoETransformerLayer, TransformerLayerSubmodules

    from plugtron.runtime.cpu import TorchNorm

    moe = get_moe_module_spec(use_te=False, num_experts=config.num_moe_experts, moe_grouped_gemm=False)
    moe.submodules.router = ParameterBiasRouter
    return ModuleSpec(module=MoETransformerLayer, submodules=TransformerLayerSubmodules(
        pre_mlp_layernorm=TorchNorm, mlp=moe, mlp_bda=get_bias_dropout_add))


def zero_expert_biases(module: torch.nn.Module) -> None:
    """A fresh router's expert bias is zero (megatron's init); generic parameter inits must not change that."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, TopKRouter) and isinstance(getattr(sub, "expert_bias", None), torch.Tensor):
                sub.expert_bias.zero_()
