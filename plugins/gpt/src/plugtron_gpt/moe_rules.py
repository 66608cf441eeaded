"""The rules a GPT config with Mixture-of-Experts or Multi-Latent Attention must follow.

Each check raises :class:`~plugtron.errors.ConfigError` naming the field and
the rule, before any tensor exists. Four kinds of rule:

* **Impossible**: megatron would fail later, often deep inside a forward pass
  (experts not divisible by expert parallelism, top-k above the expert
  count, more selected groups than groups ...).
* **Silently ignored**: a MoE or MLA knob set on a model that does not use
  it; megatron would build something else without a word.
* **Not on this machine**: fused or GPU-only paths (grouped GEMM, permute and
  router fusion, the flex/DeepEP dispatcher, fused MLA RoPE) are refused
  with what they need, by cheap probes (:mod:`plugtron.availability`).
* **Wrong gradients** (measured, see the project notes): MLA or MoE at
  TP > 1 without sequence parallelism, and MLA with megatron's stock ``local``
  spec at TP > 1 (its column-parallel down projections drop other ranks'
  contributions to the rotary key's gradient).

Nothing here imports torch or megatron.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from plugtron import availability

if TYPE_CHECKING:
    from plugtron_gpt.config import GPTModelConfig

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
}
#: MLATransformerConfig fields that only MLA reads.
MLA_ONLY: dict[str, Any] = {
    "q_lora_rank": 512, "kv_lora_rank": 512, "qk_head_dim": 128, "qk_pos_emb_head_dim": 64,
    "v_head_dim": 128, "cache_mla_latents": False,
}
#: MLATransformerConfig's RoPE fields, derived from the family's position-embedding fields.
MLA_ROPE_FROM: dict[str, str] = {
    "rope_type": "position_embedding_type",
    "rotary_scaling_factor": "yarn_rotary_scaling_factor",
    "original_max_position_embeddings": "yarn_original_max_position_embeddings",
    "beta_fast": "yarn_beta_fast",
    "beta_slow": "yarn_beta_slow",
    "mscale": "yarn_mscale",
    "mscale_all_dim": "yarn_mscale_all_dim",
}
SCORE_FUNCTIONS = ("softmax", "sigmoid")
LOAD_BALANCING = ("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none")
DISPATCHERS = ("allgather", "alltoall", "flex")
ROUTER_DTYPES = (None, "fp32", "fp64")
DROP_POLICIES = ("probs", "position")


def _tp(cfg: "GPTModelConfig") -> int:
    return cfg._get("tensor_model_parallel_size", 1) or 1


def _gpu_feature(*modules: tuple[str, str]) -> str | None:
    """Why a GPU-only feature is unavailable here, or None when it is available."""
    found = availability.gpu_modules(*modules)
    return None if found.ok else found.reason


def mla_rope_kwargs(cfg: "GPTModelConfig") -> dict[str, Any]:
    """MLATransformerConfig's RoPE keywords from the family's own fields."""
    yarn = cfg.position_embedding_type == "yarn"
    kwargs: dict[str, Any] = {
        "rope_type": "yarn" if yarn else "rope",
        "rotary_base": cfg.rotary_base,
        "rotary_percent": cfg.rotary_percent,
        # MLA scales its softmax by yarn's mscale(rotary_scaling_factor, mscale_all_dim):
        # 1.0 keeps plain RoPE unscaled.
        "rotary_scaling_factor": cfg.yarn_rotary_scaling_factor if yarn else 1.0,
    }
    if yarn:
        for field, source in MLA_ROPE_FROM.items():
            if field not in kwargs:
                kwargs[field] = getattr(cfg, source)
    return kwargs


# -- MoE ------------------------------------------------------------------------------
def check_moe(cfg: "GPTModelConfig") -> None:
    get = cfg._get
    experts = get("num_moe_experts")
    if experts is None:
        for name, default in MOE_DEFAULTS.items():
            if name in cfg._tc_kwargs and get(name) != default:
                cfg._fail(name, "only applies to Mixture-of-Experts models, and num_moe_experts is not set (megatron would ignore it)")
        return
    if not isinstance(experts, int) or isinstance(experts, bool) or experts < 1:
        cfg._fail("num_moe_experts", f"must be a positive integer, got {experts!r}")
    _check_routing(cfg, experts)
    _check_expert_layout(cfg, experts)
    _check_dispatch(cfg)
    _check_fused_paths(cfg)
    _check_layer_freq(cfg)


def _check_routing(cfg: "GPTModelConfig", experts: int) -> None:
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


def _check_groups(cfg: "GPTModelConfig", experts: int, topk: int) -> None:
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


def _check_expert_layout(cfg: "GPTModelConfig", experts: int) -> None:
    get = cfg._get
    ep = get("expert_model_parallel_size", 1) or 1
    if not isinstance(ep, int) or ep < 1:
        cfg._fail("expert_model_parallel_size", f"must be a positive integer, got {ep!r}")
    if experts % ep:
        cfg._fail("expert_model_parallel_size", f"num_moe_experts={experts} must be divisible by expert_model_parallel_size={ep}")
    etp = get("expert_tensor_parallel_size") or _tp(cfg)
    if not isinstance(etp, int) or etp < 1:
        cfg._fail("expert_tensor_parallel_size", f"must be a positive integer, got {etp!r}")
    ffn = get("moe_ffn_hidden_size") or get("ffn_hidden_size") or 4 * get("hidden_size")
    if ffn % etp:
        cfg._fail("moe_ffn_hidden_size", f"{ffn} must be divisible by expert_tensor_parallel_size={etp}")
    if etp > 1 and get("add_bias_linear", True):
        cfg._fail("add_bias_linear", f"megatron supports MoE biases only with expert_tensor_parallel_size=1, not {etp}")
    shared = get("moe_shared_expert_intermediate_size")
    if shared is not None and (not isinstance(shared, int) or shared <= 0 or shared % _tp(cfg)):
        cfg._fail("moe_shared_expert_intermediate_size", f"must be a positive multiple of tensor_model_parallel_size={_tp(cfg)}, got {shared!r}")
    if shared is None:
        for name in ("moe_shared_expert_gate", "moe_shared_expert_overlap"):
            if get(name):
                cfg._fail(name, "needs a shared expert (moe_shared_expert_intermediate_size)")


def _check_dispatch(cfg: "GPTModelConfig") -> None:
    get = cfg._get
    dispatcher = get("moe_token_dispatcher_type", "allgather")
    if dispatcher not in DISPATCHERS:
        cfg._fail("moe_token_dispatcher_type", f"must be one of {', '.join(DISPATCHERS)}, not {dispatcher!r}")
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


def _check_fused_paths(cfg: "GPTModelConfig") -> None:
    """GPU-only paths, refused with what they need when this machine lacks it."""
    get = cfg._get
    if get("moe_token_dispatcher_type") == "flex" or get("moe_enable_deepep"):
        field = "moe_enable_deepep" if get("moe_enable_deepep") else "moe_token_dispatcher_type"
        why = _gpu_feature(("deep_ep", "DeepEP (github.com/deepseek-ai/DeepEP)"))
        if why:
            cfg._fail(field, f"the flex dispatcher needs DeepEP and CUDA: {why}; use 'alltoall' or 'allgather'")
    if get("moe_grouped_gemm"):
        te = availability.gpu_modules(("transformer_engine", "transformer-engine[pytorch]"))
        legacy = availability.gpu_modules(("grouped_gemm", "grouped_gemm"))
        if not (te.ok or legacy.ok):
            cfg._fail("moe_grouped_gemm", f"needs CUDA and transformer-engine (TEGroupedMLP) or the grouped_gemm package: {te.reason}; {legacy.reason}. Without it experts run one by one (SequentialMLP)")
    for name in ("moe_permute_fusion", "moe_router_fusion"):
        if get(name):
            why = _gpu_feature(("transformer_engine", "transformer-engine[pytorch]"))
            if why:
                cfg._fail(name, f"is a transformer-engine fused kernel: {why}")


def _check_layer_freq(cfg: "GPTModelConfig") -> None:
    freq = cfg._get("moe_layer_freq", 1)
    layers = cfg._get("num_layers")
    if isinstance(freq, bool) or not isinstance(freq, (int, list)):
        cfg._fail("moe_layer_freq", f"must be an integer N (every N-th layer is MoE) or a list of 0/1 per layer, got {freq!r}")
    if isinstance(freq, int) and freq < 1:
        cfg._fail("moe_layer_freq", f"must be >= 1, got {freq}")
    if isinstance(freq, list):
        if len(freq) != layers or any(v not in (0, 1) or isinstance(v, bool) for v in freq):
            cfg._fail("moe_layer_freq", f"a list must hold one 0 (dense) or 1 (MoE) per layer, {layers} in all; got {freq!r}")
        if not any(freq):
            cfg._fail("moe_layer_freq", "has no MoE layer (all 0): unset num_moe_experts for a dense model")


# -- MLA ------------------------------------------------------------------------------
def check_mla(cfg: "GPTModelConfig") -> None:
    get = cfg._get
    for name in MLA_ROPE_FROM:
        if name in cfg._tc_kwargs:
            source = MLA_ROPE_FROM[name]
            cfg._fail(name, f"is derived from the family's {source} (and rotary_base/rotary_percent); set that instead")
    if not cfg.is_mla():
        for name, default in MLA_ONLY.items():
            if name in cfg._tc_kwargs and get(name) != default:
                cfg._fail(name, "only applies with multi_latent_attention=True (megatron would ignore it)")
        return
    kind = cfg.position_embedding_type
    if kind not in ("rope", "yarn"):
        cfg._fail("position_embedding_type", f"Multi-Latent Attention applies RoPE itself: 'rope' or 'yarn', not {kind!r}")
    for name, value in (("kv_lora_rank", get("kv_lora_rank", 512)), ("qk_head_dim", get("qk_head_dim", 128)), ("v_head_dim", get("v_head_dim", 128))):
        if not isinstance(value, int) or value < 1:
            cfg._fail(name, f"must be a positive integer, got {value!r}")
    q_rank = get("q_lora_rank", 512)
    if q_rank is not None and (not isinstance(q_rank, int) or q_rank < 1):
        cfg._fail("q_lora_rank", f"must be a positive integer or null (no query compression), got {q_rank!r}")
    rope_dim = get("qk_pos_emb_head_dim", 64)
    if not isinstance(rope_dim, int) or rope_dim < 2 or rope_dim % 2:
        cfg._fail("qk_pos_emb_head_dim", f"RoPE needs an even number >= 2 of channels, got {rope_dim!r}")
    heads, groups = get("num_attention_heads"), get("num_query_groups")
    if groups is not None and groups != heads:
        cfg._fail("num_query_groups", "Multi-Latent Attention has no query groups (every head has its own key/value); leave it unset")
    if get("kv_channels") is not None:
        cfg._fail("kv_channels", "Multi-Latent Attention's head sizes are qk_head_dim, qk_pos_emb_head_dim and v_head_dim; leave it unset")
    if get("rotary_interleaved"):
        cfg._fail("rotary_interleaved", "megatron's MLA de-interleaves its rotary channels itself; convert interleaved checkpoints instead")
    if kind == "yarn" and not cfg._is_default("yarn_correction_range_round_to_int"):
        cfg._fail("yarn_correction_range_round_to_int", "megatron's MLA YaRN always rounds the correction range; it would be ignored")
    if get("attention_output_gate"):
        cfg._fail("attention_output_gate", "is not supported with Multi-Latent Attention (megatron 0.16)")
    if get("cache_mla_latents"):
        cfg._fail("cache_mla_latents", "is for megatron's dynamic inference with FlashMLA only, not for building or training")
    if get("apply_rope_fusion"):
        why = _gpu_feature(("triton", "triton"))
        if why:
            cfg._fail("apply_rope_fusion", f"MLA's fused RoPE is a triton kernel: {why}")
    if cfg.layer_spec == "local" and _tp(cfg) > 1:
        cfg._fail("layer_spec", "megatron's local MLA spec has column-parallel q/kv down projections, which give wrong gradients at tensor_model_parallel_size > 1; use 'torch' (replicated down projections)")


# -- tensor parallelism -----------------------------------------------------------------
def check_tensor_parallel(cfg: "GPTModelConfig") -> None:
    tp = _tp(cfg)
    if tp == 1 or not (cfg.is_moe() or cfg.is_mla()):
        return
    what = " and ".join(n for n, on in (("Mixture-of-Experts", cfg.is_moe()), ("Multi-Latent Attention", cfg.is_mla())) if on)
    if "sequence_parallel" in cfg._tc_kwargs and not cfg._get("sequence_parallel"):
        why = "megatron refuses MoE without it" if cfg.is_moe() else ""
        if cfg.is_mla():
            why = (why + "; " if why else "") + "MLA without it gives wrong gradients"
        cfg._fail("sequence_parallel", f"{what} at tensor_model_parallel_size={tp} needs sequence_parallel=True ({why}); leave it unset to have it switched on")
    if cfg.layer_spec == "local":
        cfg._fail("layer_spec", f"megatron's local spec norms refuse sequence parallelism, which {what} needs at tensor_model_parallel_size={tp}; use 'torch'")
    if cfg.auto_sequence_parallel():
        from plugtron_gpt.config import SequenceParallelNote

        warnings.warn(
            f"plugtron: sequence_parallel switched on: {what} at tensor_model_parallel_size={tp} needs it "
            "(numerically the same model; not written into saved configs)",
            SequenceParallelNote,
            stacklevel=4,
        )
