"""MambaModelConfig: pattern and size rules (error type, field, message), save/load, examples."""

from __future__ import annotations

from pathlib import Path

import pytest

from plugtron.config import from_dict, load, save, to_dict
from plugtron.errors import ConfigError

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples" / "configs" / "mamba").glob("*.yaml"))


def _error(config) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        config.finalize()
    return info.value


@pytest.mark.parametrize(
    ("pattern", "char", "position"),
    [("M*X-", "X", 2), ("mM*-", "m", 0), ("M*M ", " ", 3), ("M*Me", "e", 3)],
)
def test_bad_pattern_character_names_field_character_and_position(tiny_config, pattern, char, position):
    error = _error(tiny_config(hybrid_override_pattern=pattern))
    assert error.field == "hybrid_override_pattern"
    assert f"character {char!r} at position {position}" in str(error)
    assert "'M' (Mamba)" in str(error) and "'*' (attention)" in str(error) and "'-' (MLP)" in str(error)


def test_moe_symbol_needs_experts(tiny_config):
    """'E' layers are built (tests/mamba/test_mamba_moe_*.py); without an expert count they cannot be."""
    error = _error(tiny_config(hybrid_override_pattern="M*ME"))
    assert error.field == "num_moe_experts" and "'E'" in str(error)


@pytest.mark.parametrize("pattern", ["M*M", "M*M-M"])
def test_pattern_length_mismatch_names_both_fields(tiny_config, pattern):
    error = _error(tiny_config(hybrid_override_pattern=pattern))
    assert error.field == "hybrid_override_pattern"
    assert "num_layers is 4" in str(error) and f"has {len(pattern)} layers" in str(error)


def test_empty_pattern_is_rejected(tiny_config):
    assert _error(tiny_config(hybrid_override_pattern="")).field == "hybrid_override_pattern"


def test_no_pattern_means_all_mamba_and_ratios_use_megatrons_allocation(tiny_config):
    assert tiny_config(hybrid_override_pattern=None).finalize().layer_pattern() == "MMMM"
    from megatron.core.ssm.mamba_hybrid_layer_allocation import allocate_layers

    config = tiny_config(num_layers=8, hybrid_override_pattern=None, hybrid_attention_ratio=0.25, hybrid_mlp_ratio=0.25)
    assert config.finalize().layer_pattern() == "".join(allocate_layers(8, 0.25, 0.25))
    assert sorted(config.layer_pattern()) == sorted("MMMM**--")


def test_pattern_must_agree_with_ratios(tiny_config):
    config = tiny_config(hybrid_override_pattern="MMMM", hybrid_attention_ratio=0.25)
    error = _error(config)
    assert error.field == "hybrid_override_pattern" and "megatron's layer allocation rejects it" in str(error)


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"mamba_num_groups": 3}, "mamba_num_groups", "multiple of mamba_num_groups=3"),
        ({"mamba_head_dim": 48}, "mamba_head_dim", "must divide"),
        ({"tensor_model_parallel_size": 2, "mamba_num_groups": 1}, "mamba_num_groups", "divisible by tensor_model_parallel_size=2"),
        ({"mamba_expand": 0}, "mamba_expand", "positive integer"),
        ({"mamba_state_dim": 0}, "mamba_state_dim", "positive integer"),
        ({"position_embedding_type": "yarn"}, "position_embedding_type", "none, rope, learned_absolute"),
        ({"seq_len_interpolation_factor": 2.0}, "seq_len_interpolation_factor", "rope only"),
        ({"normalization": "L2Norm"}, "normalization", "LayerNorm, RMSNorm"),
        ({"num_moe_experts": 4}, "num_moe_experts", "no MoE"),
        ({"mtp_num_layers": 1}, "mtp_num_layers", "multi-token prediction"),
        ({"qk_layernorm": True}, "qk_layernorm", "ignored"),
        ({"vocab_size": 0}, "vocab_size", "required"),
        ({"hybrid_attention_ratio": 1.5}, "hybrid_attention_ratio", "[0, 1]"),
    ],
)
def test_rules_name_the_field(tiny_config, overrides, field, words):
    error = _error(tiny_config(**overrides))
    assert error.field == field and words in str(error), str(error)


def test_mixer_sizes_are_only_checked_when_there_are_mamba_layers(tiny_config):
    tiny_config(hybrid_override_pattern="*-*-", mamba_num_groups=3).finalize()


def test_derived_sizes(tiny_config):
    config = tiny_config().finalize()
    assert config.mamba_sizes() == {"heads": 8, "head_dim": 16, "groups": 2, "state": 16, "inner": 128}
    assert tiny_config(mamba_num_heads=4).finalize().mamba_sizes()["inner"] == 64
    assert config.padded_vocab_size() == 128
    assert tiny_config(tensor_model_parallel_size=2).padded_vocab_size() == 256
    assert tiny_config(should_pad_vocab=False).padded_vocab_size() == 100


def test_hybrid_init_scaling_is_the_default_and_can_be_turned_off(tiny_config):
    """megatron's is_hybrid_model: output projections scaled by sqrt(num_layers), not sqrt(2 num_layers)."""
    import math

    config = tiny_config().finalize()
    assert config.is_hybrid_model is True
    weight = __import__("torch").empty(4000)
    config.output_layer_init_method(weight)
    assert weight.std().item() == pytest.approx(0.02 / math.sqrt(4), rel=0.1)
    assert tiny_config(is_hybrid_model=False).finalize().is_hybrid_model is False


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_save_load_round_trip(tiny_config, tmp_path, suffix):
    import torch

    config = tiny_config(position_embedding_type="rope", rotary_base=500, share_embeddings_and_output_weights=True,
                         activation_func=torch.nn.functional.silu, gated_linear_unit=True, mamba_num_heads=8)
    path = save(config, tmp_path / f"model{suffix}")
    loaded = load(path)
    assert loaded == config and type(loaded) is type(config)
    assert to_dict(loaded) == to_dict(config)
    assert loaded.finalize().layer_pattern() == "M*M-"
    assert from_dict(to_dict(config)) == config


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_configs_load_and_are_what_save_writes(path, tmp_path):
    config = load(path)
    assert config.family == "mamba"
    config.finalize()
    assert config.use_cpu_initialization and config.hidden_dropout == 0.0 and config.attention_dropout == 0.0
    body = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    assert save(load(path), tmp_path / "again.yaml").read_text().splitlines() == body


def test_examples_cover_pure_and_hybrid():
    patterns = {p.stem: load(p).finalize().layer_pattern() for p in EXAMPLES}
    assert set(patterns["mamba2"]) == {"M"}
    assert set(patterns["hybrid"]) == {"M", "*", "-"}
