"""Mixture-of-Experts config rules every family building megatron's MoE layers shares.

Each check raises the family config's :class:`~plugtron.errors.ConfigError`
(through ``cfg._fail``) naming the field and the rule, before any tensor
exists: routing (top-k, score function, load balancing, groups, expert bias,
scaling), the expert layout (expert parallelism, expert tensor parallelism,
shared experts, biases) and token dispatch. ``cfg`` is any
:class:`~plugtron.config.ModelConfig` (``_get`` reads a field, ``_fail``
raises). The families add their own rules on top (which layers are MoE,
which fused paths their specs build): ``plugtron_gpt.moe_rules``,
``plugtron_mamba.moe_rules``. Nothing here imports torch or megatron.
"""

from __future__ import annotations

from typing import Any

#: megatron's defaults for the MoE fields (TransformerConfig, 0.16.1): a field
#: set to anything else on a dense model would be ignored.
MOE_DEFAULTS: dict[str, Any] = {
    "expert_model_parallel_size": 1,
    "expert_tensor_parallel_size": None,
    "moe_ffn_hidden_size": None,
    "moe_shared_expert_intermediate_size": None,
    "moe_shared_expert_gate": False,
    "moe_shared_expert_overlap": False,
    "moe_layer_freq": 1,
    "moe_router_load_balancing_type": "aux_loss",
    "moe_router_topk": 2,
    "moe_router_num_groups": None,
    "moe_router_group_topk": None,
    "moe_router_pre_softmax": False,
    "moe_router_topk_scaling_factor": None,
    "moe_router_score_function": "softmax",
    "moe_router_dtype": None,
    "moe_router_enable_expert_bias": False,
    "moe_router_bias_update_rate": 0.001,
    "moe_grouped_gemm": False,
    "moe_use_legacy_grouped_gemm": False,
    "moe_aux_loss_coeff": 0.0,
    "moe_z_loss_coeff": None,
    "moe_input_jitter_eps": None,
    "moe_token_dispatcher_type": "allgather",
    "moe_enable_deepep": False,
    "moe_expert_capacity_factor": None,
    "moe_pad_expert_input_to_capacity": False,
    "moe_token_drop_policy": "probs",
    "moe_permute_fusion": False,
    "moe_router_fusion": False,
    "moe_apply_probs_on_input": False,
    "moe_latent_size": None,
}
SCORE_FUNCTIONS = ("softmax", "sigmoid")
LOAD_BALANCING = ("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none")
DISPATCHERS = ("allgather", "alltoall", "flex")
ROUTER_DTYPES = (None, "fp32", "fp64")
DROP_POLICIES = ("probs", "position")


def refuse_moe_fields_without_experts(cfg: Any, applies_to: str) -> None:
    """No ``num_moe_experts``: a MoE field set away from megatron's default is refused by name (megatron would ignore
    it). ``applies_to``: what the family's MoE fields apply to, as the message says it."""
    for name, default in MOE_DEFAULTS.items():
        if name in cfg._tc_kwargs and cfg._get(name) != default:
            cfg._fail(name, f"only applies to {applies_to}, and num_moe_experts is not set (megatron would ignore it)")


def check_expert_count(cfg: Any, experts: Any) -> None:
    """``num_moe_experts``, when set, is a positive integer (not a bool)."""
    if not isinstance(experts, int) or isinstance(experts, bool) or experts < 1:
        cfg._fail("num_moe_experts", f"must be a positive integer, got {experts!r}")


def tp_of(cfg: Any) -> int:
    return cfg._get("tensor_model_parallel_size", 1) or 1


def check_routing(cfg: Any, experts: int) -> None:
    get = cfg._get
    topk = get("moe_router_topk", 2)
    if not isinstance(topk, int) or not 1 <= topk <= experts:
        cfg._fail("moe_router_topk", f"must be between 1 and num_moe_experts={experts}, got {topk!r}")
    score = get("moe_router_score_function", "softmax")
    if score not in SCORE_FUNCTIONS:
        cfg._fail("moe_router_score_function", f"must be one of {', '.join(SCORE_FUNCTIONS)}, not {score!r}")
    balancing = get("moe_router_load_balancing_type", "aux_loss")
    for kind in balancing if isinstance(balancing, list) else [balancing]:
        if kind not in LOAD_BALANCING:
            cfg._fail("moe_router_load_balancing_type", f"must be one of {', '.join(LOAD_BALANCING)} (or a list of them), not {kind!r}")
    coeff = get("moe_aux_loss_coeff") or 0.0
    if balancing == "sinkhorn" and any(coeff if isinstance(coeff, list) else [coeff]):
        cfg._fail("moe_aux_loss_coeff", "must be 0 with moe_router_load_balancing_type='sinkhorn' (megatron asserts it at the first training forward)")
    if topk == 1 and score == "softmax" and not get("moe_router_pre_softmax") and balancing != "sinkhorn":
        cfg._fail("moe_router_pre_softmax", "must be True with moe_router_topk=1 and softmax scores (a softmax over one selected expert has zero gradient)")
    if get("moe_router_enable_expert_bias") and score != "sigmoid":
        cfg._fail("moe_router_enable_expert_bias", "aux-loss-free expert bias needs moe_router_score_function='sigmoid' (megatron's rule)")
    rate = get("moe_router_bias_update_rate", 0.001)
    if rate is None or rate < 0:
        cfg._fail("moe_router_bias_update_rate", f"must be >= 0, got {rate!r}")
    scaling = get("moe_router_topk_scaling_factor")
    if scaling is not None and scaling <= 0:
        cfg._fail("moe_router_topk_scaling_factor", f"must be positive, got {scaling!r}")
    dtype = get("moe_router_dtype")
    if dtype not in ROUTER_DTYPES:
        cfg._fail("moe_router_dtype", f"must be null, 'fp32' or 'fp64', not {dtype!r}")
    for name in ("moe_aux_loss_coeff", "moe_z_loss_coeff"):
        value = get(name)
        values = value if isinstance(value, list) else [value]
        if any(v is not None and v < 0 for v in values):
            cfg._fail(name, f"must be >= 0, got {value!r}")
    _check_groups(cfg, experts, topk)


def _check_groups(cfg: Any, experts: int, topk: int) -> None:
    groups, group_topk = cfg._get("moe_router_num_groups"), cfg._get("moe_router_group_topk")
    if groups is None and group_topk is None:
        return
    if groups is None or group_topk is None:
        missing = "moe_router_num_groups" if groups is None else "moe_router_group_topk"
        cfg._fail(missing, "group-limited routing needs both moe_router_num_groups and moe_router_group_topk")
    if groups < 1 or experts % groups:
        cfg._fail("moe_router_num_groups", f"num_moe_experts={experts} must be divisible by moe_router_num_groups={groups}")
    if not 1 <= group_topk <= groups:
        cfg._fail("moe_router_group_topk", f"must be between 1 and moe_router_num_groups={groups}, got {group_topk}")
    if topk < group_topk:
        cfg._fail("moe_router_group_topk", f"megatron scores a group by its top (moe_router_topk // moe_router_group_topk) experts: needs moe_router_topk={topk} >= moe_router_group_topk={group_topk}")
    per_group = experts // groups
    if topk // group_topk > per_group or group_topk * per_group < topk:
        cfg._fail("moe_router_topk", f"{topk} experts cannot be chosen from {group_topk} groups of {per_group} experts")


def check_expert_layout(cfg: Any, experts: int) -> None:
    get = cfg._get
    ep = get("expert_model_parallel_size", 1) or 1
    if not isinstance(ep, int) or ep < 1:
        cfg._fail("expert_model_parallel_size", f"must be a positive integer, got {ep!r}")
    if experts % ep:
        cfg._fail("expert_model_parallel_size", f"num_moe_experts={experts} must be divisible by expert_model_parallel_size={ep}")
    etp = get("expert_tensor_parallel_size") or tp_of(cfg)
    if not isinstance(etp, int) or etp < 1:
        cfg._fail("expert_tensor_parallel_size", f"must be a positive integer, got {etp!r}")
    ffn = get("moe_ffn_hidden_size") or get("ffn_hidden_size") or 4 * get("hidden_size")
    if ffn % etp:
        cfg._fail("moe_ffn_hidden_size", f"{ffn} must be divisible by expert_tensor_parallel_size={etp}")
    if etp > 1 and get("add_bias_linear", True):
        cfg._fail("add_bias_linear", f"megatron supports MoE biases only with expert_tensor_parallel_size=1, not {etp}")
    shared = get("moe_shared_expert_intermediate_size")
    if shared is not None and (not isinstance(shared, int) or shared <= 0 or shared % tp_of(cfg)):
        cfg._fail("moe_shared_expert_intermediate_size", f"must be a positive multiple of tensor_model_parallel_size={tp_of(cfg)}, got {shared!r}")
    if shared is None:
        for name in ("moe_shared_expert_gate", "moe_shared_expert_overlap"):
            if get(name):
                cfg._fail(name, "needs a shared expert (moe_shared_expert_intermediate_size)")


def check_dispatch(cfg: Any, dispatchers: tuple[str, ...] = DISPATCHERS) -> None:
    """Token dispatch; ``dispatchers``: those the family's specs build (``flex`` needs DeepEP)."""
    get = cfg._get
    dispatcher = get("moe_token_dispatcher_type", "allgather")
    if dispatcher not in dispatchers:
        cfg._fail("moe_token_dispatcher_type", f"must be one of {', '.join(dispatchers)}, not {dispatcher!r}")
    if get("moe_shared_expert_overlap") and dispatcher != "alltoall":
        cfg._fail("moe_shared_expert_overlap", f"works with the alltoall dispatcher only, not {dispatcher!r}")
    factor = get("moe_expert_capacity_factor")
    if factor is not None and factor <= 0:
        cfg._fail("moe_expert_capacity_factor", f"must be positive (or null for no token dropping), got {factor!r}")
    if get("moe_pad_expert_input_to_capacity") and factor is None:
        cfg._fail("moe_pad_expert_input_to_capacity", "needs moe_expert_capacity_factor (the capacity to pad to)")
    policy = get("moe_token_drop_policy", "probs")
    if policy not in DROP_POLICIES:
        cfg._fail("moe_token_drop_policy", f"must be 'probs' or 'position', not {policy!r}")
