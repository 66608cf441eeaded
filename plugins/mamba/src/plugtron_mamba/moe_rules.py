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

The GPT family enforces the same MoE rules in ``plugtron_gpt.moe_rules``;
plugins never import each other, so the subset the Mamba family needs lives
here until the rules move into the core. Nothing here imports torch.
"""

from __future__ import annotations

from typing import Any

#: megatron's defaults (TransformerConfig 0.16.1) of the MoE fields that only MoE layers read.
MOE_DEFAULTS: dict[str, Any] = {
    "expert_model_parallel_size": 1, "expert_tensor_parallel_size": None, "moe_ffn_hidden_size": None,
    "moe_shared_expert_intermediate_size": None, "moe_shared_expert_gate": False, "moe_shared_expert_overlap": False,
    "moe_layer_freq": 1, "moe_router_topk": 2, "moe_router_num_groups": None, "moe_router_group_topk": None,
    "moe_router_pre_softmax": False, "moe_router_topk_scaling_factor": None, "moe_router_score_function": "softmax",
    "moe_router_dtype": None, "moe_router_enable_expert_bias": False, "moe_grouped_gemm": False,
    "moe_token_dispatcher_type": "allgather", "moe_enable_deepep": False, "moe_permute_fusion": False,
    "moe_router_fusion": False, "moe_latent_size": None, "moe_apply_probs_on_input": False,
}
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
SCORE_FUNCTIONS = ("softmax", "sigmoid")
DISPATCHERS = ("allgather", "alltoall")


def check_moe(cfg: Any) -> None:
    get = cfg._get
    experts, has_e = get("num_moe_experts"), "E" in cfg.layer_pattern()
    if not experts:
        if has_e:
            cfg._fail("num_moe_experts", f"the layer pattern {cfg.layer_pattern()!r} has MoE ('E') layers; set the expert count")
        for name, default in MOE_DEFAULTS.items():
            if name in cfg._tc_kwargs and get(name) != default:
                cfg._fail(name, "only applies to MoE ('E') layers, and num_moe_experts is not set (megatron would ignore it)")
        return
    if not isinstance(experts, int) or isinstance(experts, bool) or experts < 1:
        cfg._fail("num_moe_experts", f"must be a positive integer, got {experts!r}")
    if not has_e:
        cfg._fail("num_moe_experts", f"is {experts} but the layer pattern {cfg.layer_pattern()!r} has no MoE ('E') layer (megatron would ignore it)")
    if get("moe_layer_freq", 1) != 1:
        cfg._fail("moe_layer_freq", "the hybrid pattern's 'E' layers are the MoE layers; megatron's Mamba stack ignores moe_layer_freq")
    for name, why in NOT_BUILT.items():
        if get(name, MOE_DEFAULTS[name]) != MOE_DEFAULTS[name]:
            cfg._fail(name, f"is {get(name)!r}: {why}")
    _check_routing(cfg, experts)
    _check_layout(cfg, experts)


def _check_routing(cfg: Any, experts: int) -> None:
    get = cfg._get
    topk = get("moe_router_topk", 2)
    if not isinstance(topk, int) or not 1 <= topk <= experts:
        cfg._fail("moe_router_topk", f"must be between 1 and num_moe_experts={experts}, got {topk!r}")
    score = get("moe_router_score_function", "softmax")
    if score not in SCORE_FUNCTIONS:
        cfg._fail("moe_router_score_function", f"must be one of {', '.join(SCORE_FUNCTIONS)}, not {score!r}")
    if get("moe_router_enable_expert_bias") and score != "sigmoid":
        cfg._fail("moe_router_enable_expert_bias", "aux-loss-free expert bias needs moe_router_score_function='sigmoid' (megatron's rule)")
    scaling = get("moe_router_topk_scaling_factor")
    if scaling is not None and scaling <= 0:
        cfg._fail("moe_router_topk_scaling_factor", f"must be positive, got {scaling!r}")
    groups, group_topk = get("moe_router_num_groups"), get("moe_router_group_topk")
    if groups is None and group_topk is None:
        return
    if groups is None or group_topk is None:
        cfg._fail("moe_router_num_groups" if groups is None else "moe_router_group_topk",
                  "group-limited routing needs both moe_router_num_groups and moe_router_group_topk")
    if groups < 1 or experts % groups:
        cfg._fail("moe_router_num_groups", f"num_moe_experts={experts} must be divisible by moe_router_num_groups={groups}")
    if not 1 <= group_topk <= groups or topk < group_topk:
        cfg._fail("moe_router_group_topk", f"must be between 1 and min(moe_router_num_groups={groups}, moe_router_topk={topk}), got {group_topk}")
    if topk // group_topk > experts // groups or group_topk * (experts // groups) < topk:
        cfg._fail("moe_router_topk", f"{topk} experts cannot be chosen from {group_topk} groups of {experts // groups} experts")


def _check_layout(cfg: Any, experts: int) -> None:
    get = cfg._get
    tp = get("tensor_model_parallel_size", 1) or 1
    ep = get("expert_model_parallel_size", 1) or 1
    if experts % ep:
        cfg._fail("expert_model_parallel_size", f"num_moe_experts={experts} must be divisible by expert_model_parallel_size={ep}")
    etp = get("expert_tensor_parallel_size") or tp
    ffn = get("moe_ffn_hidden_size") or get("ffn_hidden_size") or 4 * get("hidden_size")
    if ffn % etp:
        cfg._fail("moe_ffn_hidden_size", f"{ffn} must be divisible by expert_tensor_parallel_size={etp}")
    if etp > 1 and get("add_bias_linear", True):
        cfg._fail("add_bias_linear", f"megatron supports MoE biases only with expert_tensor_parallel_size=1, not {etp}")
    shared = get("moe_shared_expert_intermediate_size")
    if shared is not None and (not isinstance(shared, int) or shared <= 0 or shared % tp):
        cfg._fail("moe_shared_expert_intermediate_size", f"must be a positive multiple of tensor_model_parallel_size={tp}, got {shared!r}")
    if shared is None:
        for name in ("moe_shared_expert_gate", "moe_shared_expert_overlap"):
            if get(name):
                cfg._fail(name, "needs a shared expert (moe_shared_expert_intermediate_size)")
    dispatcher = get("moe_token_dispatcher_type", "allgather")
    if dispatcher not in DISPATCHERS:
        cfg._fail("moe_token_dispatcher_type", f"must be one of {', '.join(DISPATCHERS)} in the mamba family, not {dispatcher!r}")
    if get("moe_shared_expert_overlap") and dispatcher != "alltoall":
        cfg._fail("moe_shared_expert_overlap", f"works with the alltoall dispatcher only, not {dispatcher!r}")
    if tp > 1 and not get("sequence_parallel") and not cfg.auto_sequence_parallel():
        cfg._fail("sequence_parallel", f"megatron refuses MoE layers at tensor_model_parallel_size={tp} without sequence parallelism (moe_layer.py); leave it unset to have it switched on")
