"""Plain megatron field dicts <-> ``GPTModelConfig``.

Architecture modules read and write plain dicts of megatron config field
names (torch-free, comparable, easy to test); these two functions are the
one place that turns them into the family's config object and back.
"""

from __future__ import annotations

from typing import Any

#: Settings every converted GPT model gets: CPU-safe construction, no dropout
#: (HF checkpoints are compared and exported in inference numerics).
CONVERSION_DEFAULTS: dict[str, Any] = {"use_cpu_initialization": True, "hidden_dropout": 0.0, "attention_dropout": 0.0}
#: megatron's YaRN treats mscale=None/None exactly as its defaults 1.0/0.0 (concentration = mscale(factor)).
_YARN_NEUTRAL = (1.0, 0.0)

#: The fields architecture modules read and write (what a GPT's numbers depend on).
FIELDS = (
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels", "ffn_hidden_size",
    "layernorm_epsilon", "normalization", "gated_linear_unit", "add_bias_linear", "add_qkv_bias", "qk_layernorm",
    "vocab_size", "seq_length", "position_embedding_type", "share_embeddings_and_output_weights", "rotary_base",
    "rotary_percent", "rope_scaling", "rope_scaling_factor", "seq_len_interpolation_factor",
    "apply_residual_connection_post_layernorm", "layernorm_zero_centered_gamma", "rotary_interleaved",
    "num_moe_experts", "multi_latent_attention", "softmax_scale", "window_size", "apply_query_key_layer_scaling",
    "embedding_multiplier", "residual_multiplier", "logits_divisor", "norm_placement", "qk_norm_scope",
    "embedding_multiplier_cast", "attention_softcap", "final_logit_softcap", "rotary_base_local", "window_attn_skip_freq",
    "no_rope_freq",
    "moe_ffn_hidden_size", "moe_router_topk", "moe_router_pre_softmax", "moe_layer_freq", "moe_shared_expert_intermediate_size", "moe_shared_expert_gate", "moe_input_jitter_eps", "moe_router_score_function", "moe_router_topk_scaling_factor", "moe_router_num_groups", "moe_router_group_topk", "moe_router_enable_expert_bias", "mtp_num_layers",
)
#: MLATransformerConfig's sizes, present only with multi_latent_attention (a dense config has no such attributes).
_MLA = ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim")
_YARN = ("yarn_rotary_scaling_factor", "yarn_original_max_position_embeddings", "yarn_beta_fast", "yarn_beta_slow",
         "yarn_mscale", "yarn_mscale_all_dim", "yarn_correction_range_round_to_int")


def gpt_config_from_fields(fields: dict[str, Any]) -> Any:
    """A GPTModelConfig from an architecture's ``read`` output."""
    from plugtron.records import resolve
    from plugtron_gpt.config import GPTModelConfig

    kwargs = {**CONVERSION_DEFAULTS, **fields}
    kwargs["activation_func"] = resolve(kwargs.pop("activation"))
    if kwargs.get("position_embedding_type") == "yarn" and kwargs.get("yarn_mscale") is None:
        kwargs["yarn_mscale"], kwargs["yarn_mscale_all_dim"] = _YARN_NEUTRAL
    return GPTModelConfig(**kwargs)


def fields_from_gpt_config(config: Any) -> dict[str, Any]:
    """The plain field dict architecture modules work with."""
    from plugtron.records import import_path_of

    fields = {name: getattr(config, name) for name in FIELDS}
    fields["activation"] = import_path_of(config.activation_func)
    if fields["multi_latent_attention"]:
        fields.update({name: getattr(config, name) for name in _MLA})
    if config.position_embedding_type == "yarn":
        fields.update({name: getattr(config, name) for name in _YARN})
        if (fields["yarn_mscale"], fields["yarn_mscale_all_dim"]) == _YARN_NEUTRAL:
            fields["yarn_mscale"] = fields["yarn_mscale_all_dim"] = None
    if fields.get("window_size") is not None:  # architectures read JSON lists; the config keeps a tuple
        fields["window_size"] = list(fields["window_size"])
    if fields["ffn_hidden_size"] is None:
        fields["ffn_hidden_size"] = 4 * fields["hidden_size"]
    return fields
