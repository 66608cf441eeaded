"""HF config.json <-> megatron field translation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers

from plugtron.conversion import NON_NUMERIC_KEYS
from plugtron.manager import PlugtronPluginManager
from plugtron_gpt.hf.catalogue import architecture_of, from_megatron_fields, to_megatron_fields
from plugtron_gpt.hf.llama import GELU_TANH, SILU
from plugtron_hf_bridge.errors import CheckpointFormatError, UnsupportedConfigError
from plugtron_hf_bridge.hf_config import architecture_from, read_hf_config

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=100, max_position_embeddings=256)


def tiny_config(arch: str, **overrides) -> dict:
    """A config.json-like dict built by transformers' own config class."""
    if arch == "GPT2LMHeadModel":
        cfg = transformers.GPT2Config(**{**dict(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=16,
                                                  bos_token_id=0, eos_token_id=0), **overrides})
    else:
        extra = {"sliding_window": None} if arch == "MistralForCausalLM" else {}
        cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
        cfg = cls(**{**SMALL, **extra, **overrides})
    d = cfg.to_dict()
    d["architectures"] = [arch]
    return d


EXPECTED = {
    "LlamaForCausalLM": dict(add_qkv_bias=False, add_bias_linear=False, qk_layernorm=False, kv_channels=16),
    "MistralForCausalLM": dict(add_qkv_bias=False, add_bias_linear=False, qk_layernorm=False, kv_channels=16),
    "Qwen2ForCausalLM": dict(add_qkv_bias=True, add_bias_linear=False, qk_layernorm=False, kv_channels=16),
    "Qwen3ForCausalLM": dict(add_qkv_bias=False, add_bias_linear=False, qk_layernorm=True, kv_channels=128),  # class default
    "GPT2LMHeadModel": dict(add_qkv_bias=True, add_bias_linear=True, qk_layernorm=False, kv_channels=8,
                            num_query_groups=4, normalization="LayerNorm", activation=GELU_TANH, gated_linear_unit=False,
                            position_embedding_type="learned_absolute", ffn_hidden_size=128, seq_length=16,
                            share_embeddings_and_output_weights=True, layernorm_epsilon=1e-5),
}


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_round_trip(arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    original = tiny_config(arch)
    fields = to_megatron_fields(original)
    for key, value in EXPECTED[arch].items():
        assert fields[key] == value, key
    if arch != "GPT2LMHeadModel":
        assert fields["normalization"] == "RMSNorm" and fields["activation"] == SILU and fields["gated_linear_unit"]
        assert fields["num_query_groups"] == 2 and fields["seq_length"] == 256 and fields["rotary_base"] == 10000.0
        assert fields["position_embedding_type"] == "rope" and fields["vocab_size"] == 100
    exported = from_megatron_fields(fields, arch)
    assert to_megatron_fields(exported) == fields
    for key, value in original.items():  # the numbers-relevant HF keys survive unchanged
        if key not in NON_NUMERIC_KEYS:
            assert exported.get(key) == value, key
    # with the original as passthrough (token ids etc.), everything but the version stamp survives
    exported = from_megatron_fields(fields, arch, passthrough=original)
    assert {k: v for k, v in exported.items() if k != "transformers_version"} == \
        {k: v for k, v in original.items() if k != "transformers_version"}
    (tmp_path / "config.json").write_text(json.dumps(exported))
    loaded = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(loaded).__name__ == arch.replace("ForCausalLM", "Config").replace("LMHeadModel", "Config")
    assert to_megatron_fields(read_hf_config(tmp_path)) == fields


def test_qwen3_explicit_head_dim_and_tied_embeddings() -> None:
    fields = to_megatron_fields(tiny_config("Qwen3ForCausalLM", head_dim=32, tie_word_embeddings=True))
    assert fields["kv_channels"] == 32 and fields["share_embeddings_and_output_weights"] is True
    assert to_megatron_fields(from_megatron_fields(fields, "Qwen3ForCausalLM")) == fields


def test_old_style_rope_keys_are_understood() -> None:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 100,
           "max_position_embeddings": 8192 * 4, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu",
           "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}, "torch_dtype": "bfloat16"}
    fields = to_megatron_fields(cfg)
    assert fields["rotary_base"] == 500000.0 and fields["rope_scaling"] is True and fields["rope_scaling_factor"] == 8.0
    assert fields["layernorm_epsilon"] == 1e-5 and fields["kv_channels"] == 16
    assert to_megatron_fields(from_megatron_fields(fields, "LlamaForCausalLM")) == fields


def test_linear_and_yarn_rope() -> None:
    linear = to_megatron_fields(tiny_config("LlamaForCausalLM", rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                                   "rope_theta": 1e4}))
    assert linear["seq_len_interpolation_factor"] == 2.0 and linear["position_embedding_type"] == "rope"
    yarn_params = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6, "original_max_position_embeddings": 64,
                   "beta_fast": 16.0, "mscale": 0.7, "mscale_all_dim": 0.7}
    yarn = to_megatron_fields(tiny_config("Qwen2ForCausalLM", rope_parameters=yarn_params))
    assert yarn["position_embedding_type"] == "yarn" and yarn["rotary_base"] == 1e6
    assert (yarn["yarn_rotary_scaling_factor"], yarn["yarn_original_max_position_embeddings"]) == (4.0, 64)
    assert (yarn["yarn_beta_fast"], yarn["yarn_beta_slow"], yarn["yarn_mscale"], yarn["yarn_mscale_all_dim"]) == (16.0, 1.0, 0.7, 0.7)
    assert yarn["yarn_correction_range_round_to_int"] is True
    for fields, arch in ((linear, "LlamaForCausalLM"), (yarn, "Qwen2ForCausalLM")):
        assert to_megatron_fields(from_megatron_fields(fields, arch)) == fields


@pytest.mark.parametrize("key", ["quantization_config", "logit_scale", "residual_multiplier"])
def test_unknown_numerics_key_is_named(key: str) -> None:
    cfg = tiny_config("LlamaForCausalLM")
    cfg[key] = {"bits": 4} if key == "quantization_config" else 2.0
    with pytest.raises(UnsupportedConfigError) as info:
        to_megatron_fields(cfg, source="some/config.json")
    assert info.value.field == key and key in str(info.value) and "some/config.json" in str(info.value)


def test_non_numeric_keys_are_accepted() -> None:
    cfg = tiny_config("Qwen2ForCausalLM")
    cfg.update(torch_dtype="bfloat16", bos_token_id=5, use_cache=False, initializer_range=0.5, attention_dropout=0.1)
    to_megatron_fields(cfg)


def test_an_active_sliding_window_is_translated_or_refused_never_ignored() -> None:
    """A window changes the numbers: Mistral and Qwen2 express it as megatron's ``window_size`` (HF's window W
    sees W keys, megatron's ``(W - 1, 0)`` the same), Llama refuses it by name; a window that is off is no window."""
    mistral = to_megatron_fields(tiny_config("MistralForCausalLM", sliding_window=4096))
    assert (mistral["window_size"], mistral["window_attn_skip_freq"]) == ([4095, 0], None)
    assert from_megatron_fields(mistral, "MistralForCausalLM")["sliding_window"] == 4096
    with pytest.raises(UnsupportedConfigError, match="sliding_window") as info:
        to_megatron_fields({**tiny_config("LlamaForCausalLM"), "sliding_window": 4096})
    assert info.value.field == "sliding_window"
    with pytest.raises(UnsupportedConfigError) as info:  # transformers' Mistral would ignore per-layer types
        to_megatron_fields({**tiny_config("MistralForCausalLM", sliding_window=4096), "layer_types": ["full_attention"] * 2})
    assert info.value.field == "layer_types"
    raw = tiny_config("Qwen2ForCausalLM")
    raw.update(use_sliding_window=True, sliding_window=32, max_window_layers=1)
    del raw["layer_types"]
    qwen = to_megatron_fields(raw)  # windowed from layer 1 on
    assert (qwen["window_size"], qwen["window_attn_skip_freq"]) == ([31, 0], [0, 1])
    exported = from_megatron_fields(qwen, "Qwen2ForCausalLM")
    assert (exported["use_sliding_window"], exported["sliding_window"], exported["layer_types"]) == \
        (True, 32, ["full_attention", "sliding_attention"])
    assert to_megatron_fields(exported) == qwen
    # a configured but disabled window (how many Qwen2 config.json files look) is no window
    raw.update(use_sliding_window=False)
    assert to_megatron_fields(raw).get("window_size") is None
    raw.update(use_sliding_window=True, max_window_layers=2)  # window only from layer 2 on: no layer uses it
    assert to_megatron_fields(raw).get("window_size") is None


@pytest.mark.parametrize("key,value", [("low_freq_factor", 2.0), ("high_freq_factor", 8.0),
                                       ("original_max_position_embeddings", 4096)])
def test_llama3_rope_constants_must_match_megatron(key: str, value: float) -> None:
    params = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192, "rope_theta": 5e5, key: value}
    cfg = tiny_config("LlamaForCausalLM", max_position_embeddings=16384)
    cfg["rope_parameters"] = params
    with pytest.raises(UnsupportedConfigError) as info:
        to_megatron_fields(cfg)
    assert info.value.field == f"rope_parameters.{key}"


@pytest.mark.parametrize("arch,overrides,field", [
    ("LlamaForCausalLM", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "rope_parameters.rope_type"),
    ("LlamaForCausalLM", {"attention_bias": True, "mlp_bias": False}, "mlp_bias"),
    ("Qwen3ForCausalLM", {"attention_bias": True}, "attention_bias"),
    ("LlamaForCausalLM", {"hidden_act": "tanh"}, "hidden_act"),
    ("GPT2LMHeadModel", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ("GPT2LMHeadModel", {"activation_function": "quick_gelu"}, "activation_function"),
])
def test_unsupported_values_name_the_field(arch: str, overrides: dict, field: str) -> None:
    cfg = tiny_config(arch)
    cfg.update(overrides)
    with pytest.raises(UnsupportedConfigError) as info:
        to_megatron_fields(cfg)
    assert info.value.field == field and field in str(info.value)


def test_yarn_attention_factor_mismatch_is_refused() -> None:
    cfg = tiny_config("LlamaForCausalLM")
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4, "attention_factor": 3.0,
                              "original_max_position_embeddings": 64}
    with pytest.raises(UnsupportedConfigError, match="attention_factor"):
        to_megatron_fields(cfg)


def test_architecture_detection() -> None:
    """The engine names the architecture (``architectures``, else ``model_type`` among the registered adapters);
    the adapter refuses a ``model_type`` that contradicts it."""
    pm = PlugtronPluginManager()
    assert architecture_from({"model_type": "qwen3"}, "config.json", pm) == "Qwen3ForCausalLM"
    assert architecture_from({"model_type": "gpt2"}, "config.json", pm) == "GPT2LMHeadModel"
    assert architecture_from({"architectures": ["BertForMaskedLM"]}, "config.json", pm) == "BertForMaskedLM"
    with pytest.raises(UnsupportedConfigError, match="model_type") as info:
        architecture_from({"model_type": "bert"}, "some/config.json", pm)
    assert info.value.field == "model_type" and "some/config.json" in str(info.value)
    with pytest.raises(UnsupportedConfigError, match="architectures"):
        architecture_from({"architectures": ["LlamaForCausalLM", "Qwen2ForCausalLM"]}, "config.json", pm)
    with pytest.raises(UnsupportedConfigError, match="architectures"):
        architecture_of({"architectures": ["BertForMaskedLM"]})
    assert architecture_of({"architectures": ["LlamaForCausalLM"]}) == "LlamaForCausalLM"
    mismatched = {**tiny_config("LlamaForCausalLM"), "model_type": "qwen2"}
    with pytest.raises(UnsupportedConfigError, match="model_type") as info:
        to_megatron_fields(mismatched)
    assert info.value.field == "model_type"


def test_catalogue_matches_model_type_without_architectures() -> None:
    """``plugtron_gpt.hf.catalogue`` (scripts, benchmarks) picks the architecture from ``model_type`` alike."""
    try:
        assert architecture_of({"model_type": "qwen3"}) == "Qwen3ForCausalLM"
    except ModuleNotFoundError as missing:  # the catalogue imports every architecture module to learn its model_type
        if not (missing.name or "").startswith("plugtron_gpt.hf."):
            raise
        pytest.skip(f"architecture module {missing.name} is listed in the catalogue but not written yet")
    with pytest.raises(UnsupportedConfigError, match="model_type"):
        architecture_of({"model_type": "bert"})
    fields = to_megatron_fields({k: v for k, v in tiny_config("Qwen2ForCausalLM").items() if k != "architectures"})
    assert fields == to_megatron_fields(tiny_config("Qwen2ForCausalLM"))


def test_read_hf_config_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointFormatError, match="config.json not found"):
        read_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(CheckpointFormatError) as info:
        read_hf_config(tmp_path)
    assert str(tmp_path / "config.json") in str(info.value)


@pytest.mark.parametrize("arch,change,field", [
    ("GPT2LMHeadModel", {"normalization": "RMSNorm"}, "normalization"),
    ("GPT2LMHeadModel", {"num_query_groups": 2}, "num_query_groups"),
    ("LlamaForCausalLM", {"add_qkv_bias": True}, "add_qkv_bias"),
    ("MistralForCausalLM", {"qk_layernorm": True}, "qk_layernorm"),
    ("Qwen2ForCausalLM", {"add_bias_linear": True}, "add_bias_linear"),
    ("LlamaForCausalLM", {"rotary_percent": 0.5}, "rotary_percent"),
    ("LlamaForCausalLM", {"rotary_interleaved": True}, "rotary_interleaved"),
    ("LlamaForCausalLM", {"seq_len_interpolation_factor": 2.0, "rope_scaling": True}, "seq_len_interpolation_factor"),
])
def test_from_megatron_refuses_inexpressible_fields(arch: str, change: dict, field: str) -> None:
    fields = {**to_megatron_fields(tiny_config(arch)), **change}
    with pytest.raises(UnsupportedConfigError) as info:
        from_megatron_fields(fields, arch)
    assert info.value.field == field


def test_llama_bias_flags_follow_megatron_semantics() -> None:
    """megatron puts a qkv bias on when add_bias_linear alone is set, so that still means all Llama biases."""
    fields = {**to_megatron_fields(tiny_config("LlamaForCausalLM")), "add_bias_linear": True, "add_qkv_bias": False}
    exported = from_megatron_fields(fields, "LlamaForCausalLM")
    assert exported["attention_bias"] is True and exported["mlp_bias"] is True
    assert to_megatron_fields(exported)["add_qkv_bias"] is True
