"""The ``torch`` spec's layer: megatron's local layer spec turned into the variant layer.

:func:`torch_layer_spec` takes the spec ``get_gpt_layer_local_spec`` returned
(dense or MoE, GQA or MLA) and replaces, according to the config:

* the layer class by :class:`~plugtron_gpt.layers.VariantTransformerLayer`
  with :class:`~plugtron_gpt.layers.VariantLayerSubmodules` (post norms,
  ``residual_multiplier``, ``rotary_base_local`` as spec parameters);
* every norm by :class:`~plugtron.runtime.cpu.TorchNorm` (sequence parallelism,
  zero-centred gamma); ``norm_placement`` decides which norms exist;
* per-head q/k norms by ``TorchNorm`` with ``sum_grads_over_tp`` (each TP rank
  sees only its heads), or, with ``qk_norm_scope: full``, by
  :class:`~plugtron_gpt.qk_norm.FullWidthRMSNorm` over ``num_attention_heads``
  (q) and ``num_query_groups`` (k) heads;
* the core attention by :class:`~plugtron_gpt.attention.SDPACoreAttention`,
  with ``softcap`` as a spec parameter.

Resulting parameter names per layer: ``input_layernorm`` and
``pre_mlp_layernorm`` (absent with ``post``), ``post_attention_layernorm`` and
``post_mlp_layernorm`` (with ``sandwich`` and ``post``),
``self_attention.q_layernorm`` / ``k_layernorm`` (head_dim wide, or
``heads / TP x head_dim`` wide with ``full``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec


def torch_layer_spec(spec: ModuleSpec, config: Any) -> ModuleSpec:
    from plugtron.runtime.cpu import TorchNorm
    from plugtron_gpt.attention import SDPACoreAttention
    from plugtron_gpt.layers import VariantLayerSubmodules, VariantTransformerLayer

    layer = spec.submodules
    fields = {f.name: getattr(layer, f.name) for f in dataclasses.fields(layer)}
    pre = IdentityOp if config.norm_placement == "post" else TorchNorm
    post = IdentityOp if config.norm_placement == "pre" else TorchNorm
    fields.update(input_layernorm=pre, pre_mlp_layernorm=pre, post_attention_layernorm=post, post_mlp_layernorm=post)
    attention = fields["self_attention"].submodules
    softcap = config.attention_softcap
    attention.core_attention = SDPACoreAttention if softcap is None else ModuleSpec(module=SDPACoreAttention, params={"softcap": softcap})
    if config.multi_latent_attention:
        for name in ("q_layernorm", "kv_layernorm"):
            if getattr(attention, name, IdentityOp) is not IdentityOp:
                setattr(attention, name, TorchNorm)
    elif config.qk_layernorm:
        attention.q_layernorm, attention.k_layernorm = _qk_norms(config)
    params = dict(spec.params)
    params.update(
        residual_multiplier=config.residual_multiplier,
        rotary_base_local=config.rotary_base_local,
        rotary_percent=config.rotary_percent,
    )
    return ModuleSpec(module=VariantTransformerLayer, params=params, submodules=VariantLayerSubmodules(**fields))


def _qk_norms(config: Any) -> tuple[ModuleSpec, ModuleSpec]:
    from plugtron.runtime.cpu import TorchNorm
    from plugtron_gpt.qk_norm import FullWidthRMSNorm

    if config.qk_norm_scope == "full":
        heads = config.num_attention_heads
        groups = config.num_query_groups or heads
        return ModuleSpec(module=FullWidthRMSNorm, params={"heads": heads}), ModuleSpec(module=FullWidthRMSNorm, params={"heads": groups})
    per_head = ModuleSpec(module=TorchNorm, params={"sum_grads_over_tp": True})
    return per_head, per_head
