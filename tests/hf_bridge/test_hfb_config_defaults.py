"""The config defaults kept as data (plugtron_hf_bridge.hf_defaults) agree with the installed transformers.

Reading a config.json no longer imports transformers (1.5-3.5 s); these tests are
what keeps the copy of its defaults honest: a transformers release that changes a
default or a derivation fails here, not silently in a converted model.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import transformers

from plugtron_hf_bridge.errors import UnsupportedConfigError
from plugtron_hf_bridge.hf_config import _CONFIG_CLASSES, SUPPORTED_ARCHITECTURES
from plugtron_hf_bridge.hf_defaults import DEFAULTS, resolve

SMALL = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 100, "max_position_embeddings": 64}
GPT2_SMALL = {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 50, "n_positions": 16, "n_inner": 128}

#: Configs whose resolution is compared key by key, per architecture family.
LLAMA_LIKE_CASES = [
    {},
    SMALL,
    {**SMALL, "num_key_value_heads": None},
    {**SMALL, "head_dim": 32, "tie_word_embeddings": True, "rms_norm_eps": 1e-5},
    {**SMALL, "hidden_act": "gelu", "attention_bias": True, "mlp_bias": True},
]
QWEN_CASES = [
    {**SMALL, "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2},
    {**SMALL, "use_sliding_window": False, "sliding_window": 16},
    {**SMALL, "use_sliding_window": True, "sliding_window": None},
    {**SMALL, "layer_types": ["full_attention", "sliding_attention"] * 2, "use_sliding_window": True},
]
GPT2_CASES = [{}, GPT2_SMALL, {**GPT2_SMALL, "n_inner": None, "tie_word_embeddings": False,
                               "activation_function": "gelu", "layer_norm_epsilon": 1e-6}]


def _cases(arch: str) -> list[dict]:
    if arch == "GPT2LMHeadModel":
        return GPT2_CASES
    extra = QWEN_CASES if arch.startswith("Qwen") else []
    if arch == "MistralForCausalLM":
        extra = [{**SMALL, "sliding_window": None}, {**SMALL, "sliding_window": 32}]
    cases = LLAMA_LIKE_CASES + extra
    if arch == "MistralForCausalLM":  # Mistral declares num_key_value_heads: int (None is refused, tested below)
        cases = [c for c in cases if c.get("num_key_value_heads", 0) is not None]
    return cases


def _transformers(arch: str, cfg: dict):
    return getattr(transformers, _CONFIG_CLASSES[arch]).from_dict(dict(cfg))


@pytest.mark.parametrize("arch", SUPPORTED_ARCHITECTURES)
def test_every_default_and_derived_value_matches_transformers(arch: str) -> None:
    for cfg in _cases(arch):
        ours, theirs = resolve(arch, cfg), _transformers(arch, cfg)
        for key in [*DEFAULTS[arch], "layer_types"]:
            expected = getattr(theirs, key, cfg.get(key))
            assert ours.get(key) == expected, (arch, cfg, key, ours.get(key), expected)


@pytest.mark.parametrize("arch", SUPPORTED_ARCHITECTURES)
def test_the_defaults_are_the_class_defaults(arch: str) -> None:
    """No key's default is copied wrongly: each equals the class's own default instance (before derivation)."""
    default = getattr(transformers, _CONFIG_CLASSES[arch])()
    derived = {"head_dim", "num_key_value_heads", "sliding_window", "layer_types"}
    for key, value in DEFAULTS[arch].items():
        if key not in derived:
            assert getattr(default, key) == value, (arch, key)


BAD_VALUES = [
    ("LlamaForCausalLM", "hidden_size", 64.0), ("LlamaForCausalLM", "hidden_size", True),
    ("LlamaForCausalLM", "tie_word_embeddings", 1), ("LlamaForCausalLM", "rms_norm_eps", 1),
    ("LlamaForCausalLM", "rms_norm_eps", "1e-6"), ("LlamaForCausalLM", "hidden_act", 3),
    ("LlamaForCausalLM", "attention_bias", None), ("Qwen3ForCausalLM", "head_dim", None),
    ("MistralForCausalLM", "num_key_value_heads", None), ("Qwen2ForCausalLM", "use_sliding_window", "yes"),
    ("GPT2LMHeadModel", "n_embd", 64.5), ("GPT2LMHeadModel", "layer_norm_epsilon", 0),
    ("GPT2LMHeadModel", "scale_attn_weights", None), ("LlamaForCausalLM", "hidden_size", 66),
]


@pytest.mark.parametrize("arch,key,value", BAD_VALUES)
def test_values_transformers_refuses_are_refused_naming_the_key(arch: str, key: str, value) -> None:
    cfg = {**(GPT2_SMALL if arch == "GPT2LMHeadModel" else SMALL), key: value}
    with pytest.raises(Exception):
        _transformers(arch, cfg)
    with pytest.raises(UnsupportedConfigError) as info:
        resolve(arch, cfg)
    assert info.value.field == key


def test_reading_a_config_imports_neither_torch_nor_transformers(tmp_path) -> None:
    (tmp_path / "config.json").write_text(_transformers("LlamaForCausalLM", SMALL).to_json_string())
    script = ("import sys; from plugtron_hf_bridge.hf_config import read_hf_config, to_megatron_fields; "
              f"to_megatron_fields(read_hf_config({str(tmp_path)!r}), 'LlamaForCausalLM'); "
              "print(sorted(m for m in ('torch', 'transformers', 'megatron') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout
