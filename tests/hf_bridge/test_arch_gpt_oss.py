"""gpt-oss: config.json read completely (published file included), then refused field by field.

What megatron-core 0.16.1 can express (alternating sliding window, clamped SwiGLU through
quick_gelu + glu_linear_offset + activation_func_clamp_value, router and expert biases, yarn)
is translated; what it cannot (attention sinks in the family's SDPA attention, the fused
interleaved experts tensor, other values) is named with its value in one
``UnsupportedConfigError``. See ``plugtron_gpt.hf.gpt_oss``.
"""

from __future__ import annotations

import pytest

from plugtron.conversion import UnsupportedConfigError
from plugtron_gpt.hf import catalogue

#: openai/gpt-oss-20b config.json as published (older spellings: rope_scaling + rope_theta; extra
#: keys transformers does not read: experts_per_token, initial_context_length; MXFP4 experts).
PUBLISHED = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0, "eos_token_id": 200002,
    "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880, "initial_context_length": 4096,
    "initializer_range": 0.02, "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072,
    "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24,
    "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": False, "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True, "vocab_size": 201088,
}
ALWAYS = ("self_attn.sinks", "mlp.experts.gate_up_proj")


def refusal(cfg: dict) -> UnsupportedConfigError:
    with pytest.raises(UnsupportedConfigError) as info:
        catalogue.to_megatron_fields(cfg)
    return info.value


def test_the_published_config_is_read_completely_and_refused_by_name() -> None:
    error = refusal(PUBLISHED)
    assert error.field == "self_attn.sinks"
    message = str(error)
    assert all(what in message for what in ALWAYS)
    assert "swiglu_alpha" not in message and "attention_bias" not in message  # those are expressible here


def test_what_is_expressible_is_translated_before_the_refusal() -> None:
    """The translation itself (windows, clamped GLU, yarn) runs: a bad value there fails first, by its own name."""
    assert refusal({**PUBLISHED, "sliding_window": 0}).field == "sliding_window"
    assert refusal({**PUBLISHED, "layer_types": ["full_attention"]}).field == "layer_types"
    assert refusal({**PUBLISHED, "num_experts_per_tok": 40}).field == "num_experts_per_tok"


@pytest.mark.parametrize("key,value,named", [
    ("swiglu_alpha", 1.5, "swiglu_alpha=1.5"),
    ("attention_bias", False, "attention_bias=False"),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
])
def test_values_megatron_cannot_express_are_named_with_their_value(key, value, named) -> None:
    assert named in str(refusal({**PUBLISHED, key: value}))


@pytest.mark.parametrize("key,value,field", [
    ("quantization_config", {"quant_method": "fp8", "weight_block_size": [128, 128]}, "quantization_config.quant_method"),
    ("quantization_config", {"quant_method": "mxfp4", "group_size": 32}, "quantization_config.group_size"),
    ("experts_per_token", 2, "experts_per_token"),
    ("some_new_key", 1, "some_new_key"),
])
def test_unknown_or_unreadable_keys_are_refused_first(key, value, field) -> None:
    assert refusal({**PUBLISHED, key: value}).field == field


def test_export_as_gpt_oss_is_refused() -> None:
    with pytest.raises(UnsupportedConfigError, match="GptOssForCausalLM is refused"):
        catalogue.adapter("GptOssForCausalLM").spec.write({})
