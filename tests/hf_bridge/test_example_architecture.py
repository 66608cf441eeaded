"""The example plugin adds ``SeedOssForCausalLM`` from a package of its own, in under 30 lines.

Its parity at TP=1/TP=2/PP=2 and its round trip run with every other architecture
(``arch_cases/example_plugin.py``); here: it is found like a built-in one, reads the
config.json published on the hub, and refuses what megatron cannot express by name.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import plugtron_example.seed_oss as seed_oss
from plugtron import PlugtronPluginManager
from plugtron.conversion import UnsupportedConfigError
from plugtron_hf_bridge.adapter import load_adapter

#: ByteDance-Seed/Seed-OSS-36B-Instruct config.json as published (older spellings: rope_theta, torch_dtype).
PUBLISHED = {
    "architectures": ["SeedOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.1,
    "attention_out_bias": False, "bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 5120, "initializer_range": 0.02, "intermediate_size": 27648,
    "max_position_embeddings": 524288, "mlp_bias": False, "model_type": "seed_oss", "num_attention_heads": 80,
    "num_hidden_layers": 64, "num_key_value_heads": 8, "residual_dropout": 0.1, "rms_norm_eps": 1e-06,
    "rope_scaling": {"rope_type": "default"}, "rope_theta": 10000000.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.55.0", "use_cache": True, "vocab_size": 155136,
}


def test_the_architecture_module_is_at_most_30_lines() -> None:
    assert len(Path(seed_oss.__file__).read_text().splitlines()) <= 30


def test_found_through_the_plugin_manager_like_a_built_in_one() -> None:
    pm = PlugtronPluginManager()
    info = pm.converter("hf", "SeedOssForCausalLM")
    assert (info.family, info.distribution) == ("gpt", "plugtron-example-plugin")
    assert load_adapter("SeedOssForCausalLM", pm) is seed_oss.ADAPTER


def test_the_published_config_translates() -> None:
    fields = seed_oss.ADAPTER.to_fields(PUBLISHED)
    assert (fields["num_layers"], fields["hidden_size"], fields["num_query_groups"], fields["kv_channels"]) == (64, 5120, 8, 128)
    assert (fields["add_qkv_bias"], fields["add_bias_linear"], fields["rotary_base"]) == (True, False, 1e7)


@pytest.mark.parametrize("key", ["attention_out_bias", "mlp_bias"])
def test_biases_megatron_cannot_set_apart_are_refused_by_name(key) -> None:
    with pytest.raises(UnsupportedConfigError, match=f"config field '{key}'.*only q/k/v biases"):
        seed_oss.ADAPTER.to_fields({**PUBLISHED, key: True})
