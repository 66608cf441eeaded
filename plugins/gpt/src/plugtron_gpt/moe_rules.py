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

Routing, expert layout and dispatch rules are the core's
(:mod:`plugtron.config.moe_rules`, shared with the Mamba family's ``E``
layers); this module adds the GPT family's own. Nothing here imports torch or
megatron.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from plugtron import availability
from plugtron.config.moe_rules import (
    check_dispatch, check_expert_count, check_expert_layout, check_routing, refuse_moe_fields_without_experts, tp_of)

if TYPE_CHECKING:
    from plugtron_gpt.config import GPTModelConfig

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
        refuse_moe_fields_without_experts(cfg, "Mixture-of-Experts models")
        return
    check_expert_count(cfg, experts)
    check_routing(cfg, experts)
    check_expert_layout(cfg, experts)
    check_dispatch(cfg)
    _check_fused_paths(cfg)
    _check_layer_freq(cfg)


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
    if cfg.layer_spec == "local" and tp_of(cfg) > 1:
        cfg._fail("layer_spec", "megatron's local MLA spec has column-parallel q/kv down projections, which give wrong gradients at tensor_model_parallel_size > 1; use 'torch' (replicated down projections)")


# -- tensor parallelism -----------------------------------------------------------------
def check_tensor_parallel(cfg: "GPTModelConfig") -> None:
    tp = tp_of(cfg)
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
