"""Llama-like architectures (StableLM, StarCoder2, Nemotron, ERNIE 4.5, SmolLM3, Phi-3) and the sliding
windows of Mistral / Qwen2 / Qwen3: published config.json files translate (or are refused by name),
every field translated beyond Llama moves transformers' logits, refusals name field and value, and the
window / no-RoPE fields go back to HF as transformers reads them. Parity and round trips of the
``arch_cases.llama_likes`` cases run in test_arch_parity.py and test_arch_multirank.py."""

from __future__ import annotations

import warnings
from typing import Any

import pytest

from arch_cases import field_matters
from arch_cases.llama_likes import CASES
from plugtron.conversion import UnsupportedConfigError
from plugtron_gpt.hf.catalogue import adapter, from_megatron_fields, to_megatron_fields
from plugtron_gpt.hf.llama import GELU_TANH, SILU, SQUARED_RELU

BY_NAME = {case.name: case for case in CASES}
ROPE = {"rope_type": "default", "rope_theta": 1000.0}

# -- published config.json files, keys and values as on the hub -----------------------------------------------
STABLELM_2_1_6B = {
    "architectures": ["StableLmForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 100257,
    "eos_token_id": 100257, "hidden_act": "silu", "hidden_dropout": 0.0, "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 5632, "layer_norm_eps": 1e-05, "max_position_embeddings": 4096,
    "model_type": "stablelm", "num_attention_heads": 32, "num_hidden_layers": 24, "num_key_value_heads": 32,
    "partial_rotary_factor": 0.25, "qk_layernorm": False, "rope_theta": 10000, "tie_word_embeddings": False,
    "torch_dtype": "float16", "transformers_version": "4.38.0", "use_cache": True, "use_parallel_residual": False,
    "use_qkv_bias": True, "vocab_size": 100352}
STABLELM_3B_4E1T = {
    "architectures": ["StableLmForCausalLM"], "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "silu",
    "hidden_size": 2560, "initializer_range": 0.02, "intermediate_size": 6912, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 4096, "model_type": "stablelm", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 32, "partial_rotary_factor": 0.25, "rope_theta": 10000, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.38.0.dev0", "use_cache": True, "use_qkv_bias": False,
    "vocab_size": 50304}
STARCODER2_3B = {
    "architectures": ["Starcoder2ForCausalLM"], "attention_dropout": 0.1, "residual_dropout": 0.1,
    "embedding_dropout": 0.1, "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu_pytorch_tanh",
    "hidden_size": 3072, "initializer_range": 0.018042, "intermediate_size": 12288, "max_position_embeddings": 16384,
    "mlp_type": "default", "model_type": "starcoder2", "norm_epsilon": 1e-05, "norm_type": "layer_norm",
    "num_attention_heads": 24, "num_hidden_layers": 30, "num_key_value_heads": 2, "rope_theta": 999999.4420358813,
    "sliding_window": 4096, "torch_dtype": "bfloat16", "transformers_version": "4.37.0.dev0", "use_bias": True,
    "use_cache": True, "vocab_size": 49152}
MINITRON_4B_BASE = {
    "architectures": ["NemotronForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 2,
    "eos_token_id": 3, "head_dim": 128, "hidden_act": "relu2", "hidden_size": 3072, "initializer_range": 0.0134,
    "intermediate_size": 9216, "kv_channels": 128, "max_position_embeddings": 4096, "mlp_bias": False,
    "model_type": "nemotron",
    "norm_eps": 1e-05, "num_attention_heads": 24, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "partial_rotary_factor": 0.5, "rope_scaling": None, "rope_theta": 10000, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.44.0.dev0", "use_cache": True, "vocab_size": 256000}
#: The transformers-format revision (transformers 4.54 integration).
ERNIE_4_5_0_3B_PT = {
    "architectures": ["Ernie4_5ForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
    "max_position_embeddings": 131072, "model_type": "ernie4_5", "num_attention_heads": 16, "num_hidden_layers": 18,
    "num_key_value_heads": 2, "pad_token_id": 0, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 500000.0,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.54.0.dev0", "use_bias": False,
    "use_cache": True, "vocab_size": 103424}
#: The first release: Baidu's remote code (``Ernie4_5_ForCausalLM``, ``auto_map``), not transformers' class.
ERNIE_4_5_0_3B_PT_REMOTE = {
    "architectures": ["Ernie4_5_ForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_ernie4_5.Ernie4_5_Config", "AutoModel": "modeling_ernie4_5.Ernie4_5_Model",
                 "AutoModelForCausalLM": "modeling_ernie4_5.Ernie4_5_ForCausalLM"},
    "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 1024, "intermediate_size": 3072,
    "max_position_embeddings": 131072, "model_type": "ernie4_5", "num_attention_heads": 16, "num_key_value_heads": 2,
    "head_dim": 128, "num_hidden_layers": 18, "pad_token_id": 0, "rms_norm_eps": 1e-05, "use_cache": False,
    "vocab_size": 103424, "rope_theta": 500000, "use_bias": False, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16"}
SMOLLM3_3B = {
    "architectures": ["SmolLM3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": None,
    "eos_token_id": 128012, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 11008, "max_position_embeddings": 65536,
    "max_window_layers": 28, "mlp_bias": False, "model_type": "smollm3", "no_rope_layer_interval": 4,
    "no_rope_layers": [int((i + 1) % 4 != 0) for i in range(36)], "num_attention_heads": 16,
    "num_hidden_layers": 36, "num_key_value_heads": 4, "pad_token_id": 128004, "pretraining_tp": 2,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 5000000.0, "sliding_window": None,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.54.0", "use_cache": False,
    "use_sliding_window": False, "vocab_size": 128256}
PHI_3_MINI_4K = {
    "_name_or_path": "Phi-3-mini-4k-instruct", "architectures": ["Phi3ForCausalLM"], "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_phi3.Phi3Config", "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM"},
    "bos_token_id": 1, "embd_pdrop": 0.0, "eos_token_id": 32000, "hidden_act": "silu", "hidden_size": 3072,
    "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 4096, "model_type": "phi3",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "original_max_position_embeddings": 4096, "pad_token_id": 32000, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "rope_theta": 10000.0, "sliding_window": 2047, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.40.2", "use_cache": True, "attention_bias": False,
    "vocab_size": 32064}
PHI_4_MINI_LONG_FACTOR = [  # microsoft/Phi-4-mini-instruct's config.json, as several independent copies quote it
    1, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817, 2.187582649, 2.446418898,
    2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023, 4.785517845, 5.351743533, 5.984965424,
    6.693110555, 7.485043894, 8.370679318, 9.36110372, 10.4687158, 11.70738129, 13.09260651, 14.64173252,
    16.37415215, 18.31155283, 20.47818807, 22.90118105, 25.61086418, 28.64115884, 32.03, 32.1, 32.13, 32.23, 32.6,
    32.61, 32.64, 32.66, 32.7, 32.71, 32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77]
PHI_4_MINI = {
    "_name_or_path": "Phi-4-mini-instruct",
    "auto_map": {"AutoConfig": "configuration_phi3.Phi3Config", "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM",
                 "AutoTokenizer": "Xenova/gpt-4o"},
    "architectures": ["Phi3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 199999,
    "embd_pdrop": 0.0, "eos_token_id": 199999, "full_attn_mod": 1, "hidden_act": "silu", "hidden_size": 3072,
    "initializer_range": 0.02, "intermediate_size": 8192, "interpolate_factor": 1, "lm_head_bias": False,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "phi3", "num_attention_heads": 24,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "original_max_position_embeddings": 4096,
    "pad_token_id": 199999, "partial_rotary_factor": 0.75, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
    "rope_scaling": {"long_factor": PHI_4_MINI_LONG_FACTOR, "short_factor": [1.0] * 48, "type": "longrope"},
    "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0", "use_cache": True, "vocab_size": 200064}
MISTRAL_7B_V01 = {
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
    "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 32000}
QWEN2_5_7B_INSTRUCT = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
    "intermediate_size": 18944, "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen2",
    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 152064}

PUBLISHED = [
    ("stablelm-2-1_6b", STABLELM_2_1_6B, {"normalization": "LayerNorm", "rotary_percent": 0.25, "add_qkv_bias": True,
                                          "add_bias_linear": False, "kv_channels": 64, "activation": SILU}),
    ("stablelm-3b-4e1t", STABLELM_3B_4E1T, {"rotary_percent": 0.25, "add_qkv_bias": False, "kv_channels": 80}),
    ("starcoder2-3b", STARCODER2_3B, {"window_size": [4095, 0], "window_attn_skip_freq": None, "add_bias_linear": True,
                                      "gated_linear_unit": False, "activation": GELU_TANH, "normalization": "LayerNorm",
                                      "rotary_base": 999999.4420358813, "share_embeddings_and_output_weights": True}),
    ("Minitron-4B-Base", MINITRON_4B_BASE, {"layernorm_zero_centered_gamma": True, "normalization": "LayerNorm",
                                            "activation": SQUARED_RELU, "gated_linear_unit": False,
                                            "rotary_percent": 0.5, "num_query_groups": 8, "kv_channels": 128}),
    ("ERNIE-4.5-0.3B-PT", ERNIE_4_5_0_3B_PT, {"rotary_interleaved": True, "rotary_base": 500000.0, "kv_channels": 128,
                                              "share_embeddings_and_output_weights": True, "add_bias_linear": False}),
    ("SmolLM3-3B", SMOLLM3_3B, {"no_rope_freq": [int((i + 1) % 4 == 0) for i in range(36)], "rotary_base": 5000000.0,
                                "share_embeddings_and_output_weights": True}),
    ("Phi-3-mini-4k-instruct", PHI_3_MINI_4K, {"window_size": [2046, 0], "window_attn_skip_freq": None,
                                               "rotary_percent": 1.0, "kv_channels": 96}),
    ("Mistral-7B-v0.1", MISTRAL_7B_V01, {"window_size": [4095, 0], "window_attn_skip_freq": None}),
    ("Qwen2.5-7B-Instruct", QWEN2_5_7B_INSTRUCT, {"add_qkv_bias": True, "rotary_base": 1000000.0}),
]


@pytest.mark.parametrize("name,config,expected", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_published_configs_translate(name: str, config: dict, expected: dict) -> None:
    fields = to_megatron_fields(config)
    assert {key: fields.get(key) for key in expected} == expected
    if name == "Qwen2.5-7B-Instruct":  # use_sliding_window false: no window however large sliding_window is
        assert "window_size" not in fields and "window_attn_skip_freq" not in fields
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = from_megatron_fields(fields, config["architectures"][0], passthrough=config)
    assert to_megatron_fields(exported) == fields


def test_ernie_remote_code_release_is_refused_by_its_architecture_name() -> None:
    with pytest.raises(UnsupportedConfigError, match="Ernie4_5_ForCausalLM") as info:
        to_megatron_fields(ERNIE_4_5_0_3B_PT_REMOTE)
    assert info.value.field == "architectures"


def test_phi4_mini_longrope_is_refused_by_name() -> None:
    with pytest.raises(UnsupportedConfigError, match="longrope") as info:
        to_megatron_fields(PHI_4_MINI)
    assert info.value.field == "rope_scaling.type"


# -- every field translated beyond Llama changes transformers' logits -----------------------------------------
MATTERS = [
    ("stablelm", "use_qkv_bias", False), ("stablelm", "layer_norm_eps", 0.5),
    ("stablelm", "rope_parameters", {**ROPE, "partial_rotary_factor": 1.0}),
    ("starcoder2", "use_bias", False), ("starcoder2", "sliding_window", None), ("starcoder2", "norm_epsilon", 0.5),
    ("nemotron", "rope_parameters", {**ROPE, "partial_rotary_factor": 0.25}), ("nemotron", "norm_eps", 0.5),
    ("nemotron", "hidden_act", "relu"),
    ("ernie4_5", "use_bias", False),
    ("smollm3", "no_rope_layers", [1, 1, 1, 1]), ("smollm3", "layer_types", ["full_attention"] * 4),
    ("phi3", "sliding_window", None), ("phi3", "rope_parameters", {**ROPE, "partial_rotary_factor": 1.0}),
    ("mistral_window", "sliding_window", 8),
    ("qwen2_window", "max_window_layers", 3), ("qwen2_window", "use_sliding_window", False),
    ("qwen3_window", "layer_types", ["full_attention", "sliding_attention"] * 2),
]


@pytest.mark.parametrize("case_name,key,value", MATTERS, ids=[f"{c}-{k}" for c, k, _ in MATTERS])
def test_each_translated_field_moves_transformers_logits(tmp_path, case_name: str, key: str, value: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert field_matters(tmp_path, BY_NAME[case_name], key, value) > 1e-3


# -- refusals: the field and the value, never an approximation ------------------------------------------------
def _small(arch: str, **changes: Any) -> dict:
    case = next(c for c in CASES if c.architecture == arch)
    return {**case.config, "architectures": [arch], **changes}


REFUSED = [
    ("StableLmForCausalLM", {"use_parallel_residual": True}, "use_parallel_residual", "in parallel"),
    ("StableLmForCausalLM", {"qk_layernorm": True}, "qk_layernorm", "per head"),
    ("StableLmForCausalLM", {"head_dim": 32}, "head_dim", "64/4"),
    ("Phi3ForCausalLM", {"rope_scaling": {"type": "su", "short_factor": [1.0] * 6, "long_factor": [1.0] * 6}},
     "rope_scaling.type", "'su'"),
    ("Phi3ForCausalLM", {"rope_scaling": {"type": "yarn", "factor": 2.0}}, "rope_scaling.type", "LongRoPE"),
    ("Phi3ForCausalLM", {"rope_parameters": {**ROPE, "rope_type": "longrope"}}, "rope_parameters.rope_type", "longrope"),
    ("MistralForCausalLM", {"layer_types": ["sliding_attention", "full_attention"] * 2}, "layer_types", "Ministral"),
    ("Qwen2ForCausalLM", {"use_sliding_window": False, "layer_types": ["sliding_attention"] * 4}, "layer_types",
     "window is off"),
    ("Qwen2ForCausalLM", {"layer_types": ["sliding_attention", "chunked_attention"] * 2}, "layer_types",
     "chunked_attention"),
    ("SmolLM3ForCausalLM", {"use_sliding_window": False}, "layer_types", "use_sliding_window is False"),
    ("SmolLM3ForCausalLM", {"no_rope_layers": [1, 2, 1, 1]}, "no_rope_layers", "0/1"),
    ("StableLmForCausalLM", {"rope_parameters": {**ROPE, "rope_type": "yarn", "factor": 2.0}},
     "rope_parameters.rope_type", "partial_rotary_factor 0.25"),
    ("NemotronForCausalLM", {"rope_parameters": None, "rope_scaling": {"type": "yarn", "factor": 2.0}},
     "rope_scaling.rope_type",
     "rotates every channel"),
    ("NemotronForCausalLM", {"mlp_bias": False}, "mlp_bias", "attention_bias is True"),
    ("NemotronForCausalLM", {"num_key_value_heads": None}, "num_key_value_heads", "null"),
    ("NemotronForCausalLM", {"kv_channels": 16}, "kv_channels", "head_dim is 24"),
    ("Ernie4_5ForCausalLM", {"rope_parameters": {**ROPE, "rope_type": "yarn", "factor": 2.0}},
     "rope_parameters.rope_type", "interleaved"),
    ("Starcoder2ForCausalLM", {"norm_type": "rms_norm"}, "norm_type", "'rms_norm'"),
    ("Starcoder2ForCausalLM", {"sliding_window": 0}, "sliding_window", "positive"),
]


@pytest.mark.parametrize("arch,changes,field,words", REFUSED, ids=[f"{a}-{f}" for a, _, f, _ in REFUSED])
def test_what_megatron_cannot_express_is_refused_by_name(arch: str, changes: dict, field: str, words: str) -> None:
    with pytest.raises(UnsupportedConfigError, match=words) as info:
        to_megatron_fields(_small(arch, **changes))
    assert info.value.field == field


# -- export: megatron's window / no-RoPE fields as transformers reads them ------------------------------------
def _fields(arch: str, **changes: Any) -> dict:
    return {**to_megatron_fields(_small(arch)), **changes}


def test_megatron_int_patterns_export_as_transformers_layer_lists() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qwen = from_megatron_fields(_fields("Qwen2ForCausalLM", window_attn_skip_freq=2), "Qwen2ForCausalLM")
        smol = from_megatron_fields(_fields("SmolLM3ForCausalLM", no_rope_freq=2), "SmolLM3ForCausalLM")
    assert qwen["layer_types"] == ["sliding_attention", "full_attention"] * 2 and qwen["use_sliding_window"]
    assert smol["no_rope_layers"] == [1, 0, 1, 0]
    assert to_megatron_fields(smol)["no_rope_freq"] == [0, 1, 0, 1]


EXPORT_REFUSED = [
    ("MistralForCausalLM", {"window_attn_skip_freq": [1, 0, 1, 0]}, "window_attn_skip_freq"),
    ("Phi3ForCausalLM", {"window_attn_skip_freq": 2}, "window_attn_skip_freq"),
    ("Starcoder2ForCausalLM", {"window_size": [4, 2]}, "window_size"),
    ("LlamaForCausalLM", {"window_size": [4, 0]}, "window_size"),
    ("LlamaForCausalLM", {"no_rope_freq": [0, 1, 0, 1]}, "no_rope_freq"),
    ("NemotronForCausalLM", {"layernorm_zero_centered_gamma": False}, "layernorm_zero_centered_gamma"),
    ("Ernie4_5ForCausalLM", {"rotary_interleaved": False}, "rotary_interleaved"),
    ("StableLmForCausalLM", {"add_bias_linear": True}, "add_bias_linear"),
]


@pytest.mark.parametrize("arch,changes,field", EXPORT_REFUSED, ids=[f"{a}-{f}" for a, _, f in EXPORT_REFUSED])
def test_export_refuses_what_the_architecture_cannot_hold(arch: str, changes: dict, field: str) -> None:
    if arch == "LlamaForCausalLM":  # a Llama's fields (Mistral's case without its window) plus the change
        fields = {**to_megatron_fields(_small("MistralForCausalLM", sliding_window=None)), **changes}
    else:
        fields = _fields(arch, **changes)
    with pytest.raises(UnsupportedConfigError) as info:
        adapter(arch).fields_to_hf(fields)
    assert info.value.field == field
