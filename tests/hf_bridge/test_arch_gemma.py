"""Gemma, Gemma 2 and Gemma 3 (text): published configs, fields that matter, refusals, export.

Parity (TP=1, TP=2, PP=2) and the bit-exact round trip run from ``arch_cases/gemma.py``
in the shared harness; this file covers what the harness does not: the config.json
files as published on the hub, every numeric key beyond Llama's moving transformers'
logits, and what is refused (by name) both ways.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import transformers

import arch_cases
from arch_cases import field_matters
from arch_cases.gemma import GEMMA, GEMMA2, GEMMA3
from plugtron.conversion import UnsupportedConfigError
from plugtron_gpt.hf import gemma, gemma2, gemma3
from plugtron_gpt.hf.gemma2 import compact_skip_freq
from plugtron_gpt.hf.llama import FULL, GELU, GELU_TANH, SLIDING, windowed_layers

ADAPTERS = {"GemmaForCausalLM": gemma.ADAPTER, "Gemma2ForCausalLM": gemma2.ADAPTER, "Gemma3ForCausalLM": gemma3.ADAPTER}

# config.json as published on the hub (key names and values as in the files).
GEMMA_2B = {  # google/gemma-2b
    "architectures": ["GemmaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 2,
    "eos_token_id": 1, "head_dim": 256, "hidden_act": "gelu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 16384, "max_position_embeddings": 8192, "model_type": "gemma", "num_attention_heads": 8,
    "num_hidden_layers": 18, "num_key_value_heads": 1, "pad_token_id": 0, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 10000.0, "torch_dtype": "bfloat16", "transformers_version": "4.38.0.dev0", "use_cache": True,
    "vocab_size": 256000}
GEMMA_2_2B = {  # google/gemma-2-2b
    "architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
    "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "initializer_range": 0.02, "intermediate_size": 9216,
    "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 8, "num_hidden_layers": 26,
    "num_key_value_heads": 4, "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0, "sliding_window": 4096, "torch_dtype": "float32", "transformers_version": "4.42.4",
    "use_cache": True, "vocab_size": 256000}
GEMMA_3_1B_PT = {  # google/gemma-3-1b-pt
    "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
    "initializer_range": 0.02, "intermediate_size": 6912, "max_position_embeddings": 32768, "model_type": "gemma3_text",
    "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1, "pad_token_id": 0,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": None,
    "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6, "torch_dtype": "bfloat16",
    "transformers_version": "4.50.0.dev0", "use_cache": True, "vocab_size": 262144}


@pytest.fixture
def text_config_class(monkeypatch):
    """The harness derives the config class from the name (Gemma3Config: the multimodal one); use the model's own."""
    monkeypatch.setattr(arch_cases, "config_class", lambda arch: getattr(transformers, arch).config_class)


def hf_dict(arch: str, **overrides: Any) -> dict[str, Any]:
    """A config dict as transformers writes it for a small model (overrides applied to the dict, unchecked)."""
    case = {"GemmaForCausalLM": GEMMA, "Gemma2ForCausalLM": GEMMA2, "Gemma3ForCausalLM": GEMMA3}[arch]
    out = getattr(transformers, arch).config_class(**case.config).to_dict()
    out.update(architectures=[arch], **overrides)
    return out


def layer_types_of(fields: dict[str, Any]) -> list[str]:
    return [SLIDING if w else FULL for w in windowed_layers(fields, "test")[1]]


# -- published configs ----------------------------------------------------------------------
def test_gemma_2b_as_published() -> None:
    f = gemma.ADAPTER.to_fields(copy.deepcopy(GEMMA_2B))
    assert (f["num_layers"], f["hidden_size"], f["num_attention_heads"], f["num_query_groups"], f["kv_channels"],
            f["ffn_hidden_size"], f["vocab_size"], f["seq_length"]) == (18, 2048, 8, 1, 256, 16384, 256000, 8192)
    assert f["activation"] == GELU_TANH  # legacy "gelu" means the tanh form, as GemmaConfig rewrites it
    assert f["layernorm_zero_centered_gamma"] and f["embedding_multiplier"] == 2048 ** 0.5 and f["embedding_multiplier_cast"]
    assert f["share_embeddings_and_output_weights"] and f["rotary_base"] == 10000.0 and "softmax_scale" not in f


def test_gemma_2_2b_as_published() -> None:
    f = gemma2.ADAPTER.to_fields(copy.deepcopy(GEMMA_2_2B))
    assert (f["num_layers"], f["hidden_size"], f["kv_channels"], f["num_query_groups"]) == (26, 2304, 256, 4)
    assert f["norm_placement"] == "sandwich" and f["softmax_scale"] == 256 ** -0.5
    assert (f["attention_softcap"], f["final_logit_softcap"]) == (50.0, 30.0)
    assert f["window_size"] == [4095, 0] and f["window_attn_skip_freq"] == 2
    assert layer_types_of(f) == transformers.Gemma2Config.from_dict(GEMMA_2_2B).layer_types


def test_gemma_3_1b_pt_as_published() -> None:
    f = gemma3.ADAPTER.to_fields(copy.deepcopy(GEMMA_3_1B_PT))
    assert (f["num_layers"], f["hidden_size"], f["num_attention_heads"], f["num_query_groups"], f["kv_channels"],
            f["vocab_size"], f["seq_length"]) == (26, 1152, 4, 1, 256, 262144, 32768)
    assert f["qk_layernorm"] and f["norm_placement"] == "sandwich" and f["final_logit_softcap"] is None
    assert "attention_softcap" not in f and f["softmax_scale"] == 256 ** -0.5
    assert f["window_size"] == [511, 0] and f["window_attn_skip_freq"] == 6
    assert (f["rotary_base"], f["rotary_base_local"], f["seq_len_interpolation_factor"]) == (1e6, 1e4, None)
    assert layer_types_of(f) == transformers.Gemma3TextConfig.from_dict(GEMMA_3_1B_PT).layer_types
    # and it is written back as a Gemma3TextConfig that reads to the same fields
    exported = gemma3.ADAPTER.fields_to_hf(f, passthrough=GEMMA_3_1B_PT)
    assert exported["model_type"] == "gemma3_text" and gemma3.ADAPTER.to_fields(exported) == f


def test_gemma3_linear_scaling_applies_to_global_layers_only() -> None:
    """The larger Gemma 3 text configs (old spelling): linear factor 8 on global layers, local base untouched."""
    old = {**GEMMA_3_1B_PT, "rope_scaling": {"factor": 8.0, "rope_type": "linear"}}
    new = {k: v for k, v in old.items() if k not in ("rope_scaling", "rope_theta", "rope_local_base_freq")}
    new["rope_parameters"] = {FULL: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                              SLIDING: {"rope_type": "default", "rope_theta": 1e4}}
    f = gemma3.ADAPTER.to_fields(old)
    assert (f["seq_len_interpolation_factor"], f["rotary_base"], f["rotary_base_local"]) == (8.0, 1e6, 1e4)
    assert gemma3.ADAPTER.to_fields(new) == f
    hf = transformers.Gemma3TextConfig.from_dict(old).rope_parameters
    assert hf[FULL]["factor"] == 8.0 and "factor" not in hf[SLIDING]


@pytest.mark.parametrize("arch", ["Gemma2ForCausalLM", "Gemma3ForCausalLM"])
def test_exact_gelu_is_gemma2_and_3s_own_but_gemma_rewrites_it(arch) -> None:
    """GemmaConfig turns hidden_act "gelu" into the tanh form; Gemma 2/3 keep hidden_activation "gelu" exact."""
    adapter = ADAPTERS[arch]
    f = adapter.to_fields(hf_dict(arch, hidden_activation="gelu"))
    assert f["activation"] == GELU and adapter.to_fields(adapter.fields_to_hf(f)) == f
    assert gemma.ADAPTER.to_fields(hf_dict("GemmaForCausalLM", hidden_act="gelu"))["activation"] == GELU_TANH


@pytest.mark.parametrize("arch", ["Gemma2ForCausalLM", "Gemma3ForCausalLM"])
def test_all_global_layers_have_no_window(arch) -> None:
    adapter = ADAPTERS[arch]
    f = adapter.to_fields(hf_dict(arch, layer_types=[FULL] * 4))
    assert f.get("window_size") is None and f.get("window_attn_skip_freq") is None and f.get("rotary_base_local") is None
    exported = adapter.fields_to_hf(f)
    assert exported["layer_types"] == [FULL] * 4 and adapter.to_fields(exported) == f


@pytest.mark.parametrize("types,expected", [
    ([1, 0, 1, 0], 2), ([1] * 5 + [0], 6), ([1, 1, 0, 1], 3), ([1, 1, 1, 1], None), ([1, 0, 0, 1], [1, 0, 0, 1]),
    ([0, 1, 0, 1], [0, 1, 0, 1])])
def test_window_layer_selection_round_trips(types, expected) -> None:
    windowed = [bool(t) for t in types]
    fields = {"num_layers": len(types), "window_size": [4, 0], "window_attn_skip_freq": compact_skip_freq(windowed)}
    assert fields["window_attn_skip_freq"] == expected and windowed_layers(fields, "test") == (5, windowed)


# -- each numeric key beyond Llama's moves transformers' logits ------------------------------
MATTERS = [
    (GEMMA2, "query_pre_attn_scalar", 24), (GEMMA2, "attn_logit_softcapping", 50.0),
    (GEMMA2, "final_logit_softcapping", None), (GEMMA2, "sliding_window", 24), (GEMMA2, "layer_types", [FULL] * 4),
    (GEMMA3, "query_pre_attn_scalar", 24), (GEMMA3, "final_logit_softcapping", None), (GEMMA3, "sliding_window", 24),
    (GEMMA3, "layer_types", [SLIDING, SLIDING, SLIDING, FULL]),
    (GEMMA3, "rope_parameters", {SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
                                 FULL: {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0}}),
    (GEMMA3, "rope_parameters", {SLIDING: {"rope_type": "default", "rope_theta": 20.0},
                                 FULL: {"rope_type": "default", "rope_theta": 1000.0}}),
]


@pytest.mark.parametrize("case,key,value", MATTERS, ids=[f"{c.name}-{k}-{i}" for i, (c, k, _) in enumerate(MATTERS)])
def test_translated_fields_move_transformers_logits(tmp_path, text_config_class, case, key, value) -> None:
    adapter = ADAPTERS[case.architecture]
    before, after = adapter.to_fields(hf_dict(case.architecture)), adapter.to_fields(hf_dict(case.architecture, **{key: value}))
    assert before != after, key  # the converter reads the change ...
    assert field_matters(tmp_path, case, key, value) > 1e-3, key  # ... and it changes the model's numbers


def test_gemma3_attention_softcap_is_ignored_by_transformers(tmp_path, text_config_class) -> None:
    """Why Gemma 3's attn_logit_softcapping is refused rather than translated: transformers 5.23 never applies it."""
    assert field_matters(tmp_path, GEMMA3, "attn_logit_softcapping", 1.0) == 0.0


# -- refusals, reading -----------------------------------------------------------------------
REFUSED = [
    ("GemmaForCausalLM", {"attention_bias": True}, "attention_bias", "add_bias_linear"),
    ("GemmaForCausalLM", {"use_bidirectional_attention": True}, "use_bidirectional_attention", "causal"),
    ("GemmaForCausalLM", {"hidden_activation": "silu"}, "hidden_activation", "refusing to guess"),
    ("GemmaForCausalLM", {"hidden_act": "gelu_fast"}, "hidden_act", "activation"),
    ("Gemma2ForCausalLM", {"hidden_act": "silu"}, "hidden_act", "refusing to guess"),
    ("Gemma2ForCausalLM", {"sliding_window": None}, "sliding_window", "sliding_attention layers"),
    ("Gemma2ForCausalLM", {"layer_types": [SLIDING, FULL]}, "layer_types", "each of the 4 layers"),
    ("Gemma2ForCausalLM", {"layer_types": [SLIDING, FULL, "chunked_attention", FULL]}, "layer_types", "must list"),
    ("Gemma2ForCausalLM", {"attn_logit_softcapping": 0.0}, "attn_logit_softcapping", "divides"),
    ("Gemma2ForCausalLM", {"query_pre_attn_scalar": 0}, "query_pre_attn_scalar", "inverse square root"),
    ("Gemma2ForCausalLM", {"query_pre_attn_scalar": 36.0}, "query_pre_attn_scalar", "integer"),
    ("Gemma2ForCausalLM", {"use_bidirectional_attention": True}, "use_bidirectional_attention", "causal"),
    ("Gemma2ForCausalLM", {"hidden_size": 66}, "hidden_size", "multiple"),
    ("Gemma2ForCausalLM", {"rope_parameters": {"rope_type": "default", "rope_theta": 1.0, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor", "partial rotary"),
    ("Gemma3ForCausalLM", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping", "never applies"),
    ("Gemma3ForCausalLM", {"use_bidirectional_attention": True}, "use_bidirectional_attention", "causal"),
    ("Gemma3ForCausalLM", {"rope_parameters": {SLIDING: {"rope_type": "linear", "factor": 2.0, "rope_theta": 1.0},
                                               FULL: {"rope_type": "default", "rope_theta": 2.0}}},
     f"rope_parameters.{SLIDING}", "rotary_base_local"),
    ("Gemma3ForCausalLM", {"rope_parameters": {SLIDING: {"rope_type": "default", "rope_theta": 1.0},
                                               FULL: {"rope_type": "yarn", "factor": 2.0, "rope_theta": 2.0}}},
     f"rope_parameters.{FULL}.rope_type", "plain rope"),
    ("Gemma2ForCausalLM", {"hidden_activation": "gelu_fast"}, "hidden_activation", "activation"),
    ("Gemma3ForCausalLM", {"rope_parameters": {"rope_type": "default", "rope_theta": 2.0}}, "rope_parameters",
     "full_attention / sliding_attention"),
    ("Gemma3ForCausalLM", {"rope_parameters": {SLIDING: {"rope_type": "default", "rope_theta": 1.0},
                                               FULL: {"rope_type": "linear", "rope_theta": 2.0}}},
     f"rope_parameters.{FULL}.factor", "missing"),
    ("Gemma3ForCausalLM", {"partial_rotary_factor": 0.5}, "partial_rotary_factor", "partial rotary"),
    ("Gemma3ForCausalLM", {"altup_num_inputs": 4}, "altup_num_inputs", "refusing to guess"),
]


@pytest.mark.parametrize("arch,overrides,field,message", REFUSED,
                         ids=[f"{a[:6]}-{f}-{i}" for i, (a, _, f, _m) in enumerate(REFUSED)])
def test_unsupported_configs_are_refused_by_name(arch, overrides, field, message) -> None:
    with pytest.raises(UnsupportedConfigError) as info:
        ADAPTERS[arch].to_fields(hf_dict(arch, **overrides))
    assert info.value.field == field and message in str(info.value), str(info.value)


def test_model_type_must_match() -> None:
    with pytest.raises(UnsupportedConfigError, match="gemma3"):
        gemma3.ADAPTER.to_fields({**GEMMA_3_1B_PT, "model_type": "gemma3"})


# -- refusals, writing -----------------------------------------------------------------------
NOT_WRITABLE = [
    ("GemmaForCausalLM", {"layernorm_zero_centered_gamma": False}, "layernorm_zero_centered_gamma"),
    ("GemmaForCausalLM", {"embedding_multiplier": 1.0}, "embedding_multiplier"),
    ("GemmaForCausalLM", {"embedding_multiplier_cast": False}, "embedding_multiplier_cast"),
    ("GemmaForCausalLM", {"activation": GELU}, "activation"),
    ("GemmaForCausalLM", {"norm_placement": "sandwich"}, "norm_placement"),
    ("GemmaForCausalLM", {"attention_softcap": 5.0}, "attention_softcap"),
    ("GemmaForCausalLM", {"add_qkv_bias": True}, "add_qkv_bias"),
    ("Gemma2ForCausalLM", {"norm_placement": "pre"}, "norm_placement"),
    ("Gemma2ForCausalLM", {"softmax_scale": 0.3}, "softmax_scale"),
    ("Gemma2ForCausalLM", {"window_size": [4, 2]}, "window_size"),
    ("Gemma2ForCausalLM", {"rotary_base_local": 10.0}, "rotary_base_local"),
    ("Gemma2ForCausalLM", {"qk_layernorm": True}, "qk_layernorm"),
    ("Gemma3ForCausalLM", {"attention_softcap": 2.0}, "attention_softcap"),
    ("Gemma3ForCausalLM", {"qk_layernorm": False}, "qk_layernorm"),
    ("Gemma3ForCausalLM", {"qk_norm_scope": "full"}, "qk_norm_scope"),
    ("Gemma3ForCausalLM", {"residual_multiplier": 0.5}, "residual_multiplier"),
]


@pytest.mark.parametrize("arch,change,field", NOT_WRITABLE, ids=[f"{a[:6]}-{f}" for a, _, f in NOT_WRITABLE])
def test_inexpressible_fields_are_refused_on_export(arch, change, field) -> None:
    adapter = ADAPTERS[arch]
    fields = {**adapter.to_fields(hf_dict(arch)), **change}
    with pytest.raises(UnsupportedConfigError) as info:
        adapter.fields_to_hf(fields)
    assert info.value.field == field, str(info.value)


@pytest.mark.parametrize("arch", list(ADAPTERS))
def test_export_loads_as_the_right_config_class(tmp_path, arch) -> None:
    adapter = ADAPTERS[arch]
    fields = adapter.to_fields(hf_dict(arch))
    (tmp_path / "config.json").write_text(json.dumps(adapter.fields_to_hf(fields)))
    loaded = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is getattr(transformers, arch).config_class
    assert adapter.to_fields(loaded.to_dict()) == fields
