"""The rules a Mamba/hybrid config with Mixture-of-Experts (``E``) layers must follow.

Each check raises :class:`~plugtron.errors.ConfigError` naming the field,
before any tensor exists. Kinds of rule:

* **Ignored otherwise**: MoE fields on a model without ``E`` layers, and
  ``moe_layer_freq`` (the hybrid pattern, not the frequency, says which layers
  are MoE), which megatron would silently not use;
* **Impossible**: ``E`` layers without experts, experts not divisible by
  expert parallelism, top-k above the expert count, inconsistent groups;
* **Not built by this family's spec**: grouped GEMM (the ``torch`` spec runs
  experts one by one, ``SequentialMLP``), the fused / DeepEP paths, and MoE
  latent projections (megatron 0.16.1 builds them only as transformer-engine
  ``TELinear``, ``moe_layer.py:171``).

Routing, expert layout and dispatch rules are the core's
(:mod:`plugtron.config.moe_rules`, shared with the GPT family); this module
adds the hybrid pattern's. Nothing here imports torch.
"""

from __future__ import annotations

from typing import Any

from plugtron.config.moe_rules import (
    MOE_DEFAULTS, check_dispatch, check_expert_count, check_expert_layout, check_routing, refuse_moe_fields_without_experts,
    tp_of)

#: Fields the ``torch`` spec cannot honour on an ``E`` layer, with why.
NOT_BUILT: dict[str, str] = {
    "moe_grouped_gemm": "the mamba family's torch spec runs experts one by one (SequentialMLP); grouped GEMM needs "
                        "transformer-engine or the grouped_gemm package and CUDA",
    "moe_permute_fusion": "a transformer-engine fused kernel (CUDA)",
    "moe_router_fusion": "a transformer-engine fused kernel (CUDA)",
    "moe_enable_deepep": "the flex dispatcher needs DeepEP and CUDA; use 'alltoall' or 'allgather'",
    "moe_latent_size": "megatron-core 0.16.1 builds MoE latent projections only as transformer-engine TELinear "
                       "(moe_layer.py:171), which needs CUDA",
}
#: The dispatchers the ``torch`` spec builds (``flex`` needs DeepEP and CUDA).
DISPATCHERS = ("allgather", "alltoall")


def check_moe(cfg: Any) -> None:
    get = cfg._get
    experts, has_e = get("num_moe_experts"), "E" in cfg.layer_pattern()
    if not experts:
        if has_e:
            cfg._fail("num_moe_experts", f"the layer pattern {cfg.layer_pattern()!r} has MoE ('E') layers; set the expert count")
        refuse_moe_fields_without_experts(cfg, "MoE ('E') layers")
        return
    check_expert_count(cfg, experts)
    if not has_e:
        cfg._fail("num_moe_experts", f"is {experts} but the layer pattern {cfg.layer_pattern()!r} has no MoE ('E') layer (megatron would ignore it)")
    if get("moe_layer_freq", 1) != 1:
        cfg._fail("moe_layer_freq", "the hybrid pattern's 'E' layers are the MoE layers; megatron's Mamba stack ignores moe_layer_freq")
    for name, why in NOT_BUILT.items():
        if get(name, MOE_DEFAULTS[name]) != MOE_DEFAULTS[name]:
            cfg._fail(name, f"is {get(name)!r}: {why}")
    check_routing(cfg, experts)
    _check_layout(cfg, experts)


def _check_layout(cfg: Any, experts: int) -> None:
    tp = tp_of(cfg)
    check_expert_layout(cfg, experts)
    check_dispatch(cfg, DISPATCHERS)
    if tp > 1 and not cfg._get("sequence_parallel") and not cfg.auto_sequence_parallel():
        cfg._fail("sequence_parallel", f"megatron refuses MoE layers at tensor_model_parallel_size={tp} without sequence parallelism (moe_layer.py); leave it unset to have it switched on")
