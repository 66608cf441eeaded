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
* The router is megatron's ``TopKRouter``: its aux-loss-free ``expert_bias``
  stays a float32 *buffer*, which the HF engine loads and exports like a
  parameter (persistent buffers are part of the tensor table) and which the
  core keeps in float32 through the half-precision cast
  (:func:`plugtron.pipeline.wrap.keep_expert_bias_float32`), as checkpoints store it.

The GPT family builds the same MoE spec (``plugtron_gpt.specs``); plugins do
not import each other, so this module builds it from megatron and the core.
"""

from __future__ import annotations

from typing import Any


def moe_layer_spec(config: Any) -> Any:
    """``MoETransformerLayer(pre_mlp_layernorm=TorchNorm, mlp=MoELayer)`` with SequentialMLP experts."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import MoETransformerLayer, TransformerLayerSubmodules

    from plugtron.runtime.cpu import TorchNorm

    moe = get_moe_module_spec(use_te=False, num_experts=config.num_moe_experts, moe_grouped_gemm=False)
    return ModuleSpec(module=MoETransformerLayer, submodules=TransformerLayerSubmodules(
        pre_mlp_layernorm=TorchNorm, mlp=moe, mlp_bda=get_bias_dropout_add))
