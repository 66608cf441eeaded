"""GPTModelConfig: save/load round trips and the rules finalize() enforces.

A config that survives a round trip must rebuild the *same* megatron
TransformerConfig, derived fields included (``ffn_hidden_size``,
``init_method`` ...), and every impossible or silently-ignored combination
must fail before any tensor exists, with an error naming the field.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from plugtron import ConfigError
from plugtron.config import load, save, to_dict
from plugtron_gpt.config import GPTModelConfig


def same_value(a, b) -> bool:
    """Equality that sees through functools.partial (megatron's derived init methods are partials)."""
    if isinstance(a, functools.partial) and isinstance(b, functools.partial):
        return a.func is b.func and a.args == b.args and a.keywords == b.keywords
    return a is b or a == b


def assert_same_transformer(a: GPTModelConfig, b: GPTModelConfig) -> None:
    a.finalize(), b.finalize()
    for field in dataclasses.fields(a.transformer):
        left, right = getattr(a.transformer, field.name), getattr(b.transformer, field.name)
        assert same_value(left, right), f"TransformerConfig.{field.name}: {left!r} != {right!r}"


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_example_round_trip(example: Path, tmp_path: Path, suffix: str) -> None:
    config = load(example)
    again = load(save(config, tmp_path / f"config{suffix}"))
    assert type(again) is GPTModelConfig
    assert to_dict(again) == to_dict(config)
    assert again == config
    assert_same_transformer(config, again)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_round_trip_keeps_callables_and_dtypes(tiny_config, tmp_path: Path, suffix: str) -> None:
    config = tiny_config(
        activation_func=functools.partial(torch.nn.functional.gelu, approximate="tanh"),
        init_method=functools.partial(torch.nn.init.normal_, mean=0.0, std=0.01),
        params_dtype=torch.bfloat16, bf16=True, mrope_section=[2, 3, 3], position_embedding_type="mrope",
        seq_len_interpolation_factor=2.0,
    )
    again = load(save(config, tmp_path / f"config{suffix}"))
    assert again == config
    assert again.params_dtype is torch.bfloat16 and again.mrope_section == [2, 3, 3]
    assert_same_transformer(config, again)


REJECTED = [
    ({"vocab_size": 0}, "vocab_size", "is required"),
    ({"seq_length": 0}, "seq_length", "must be positive"),
    ({"make_vocab_size_divisible_by": 0}, "make_vocab_size_divisible_by", ">= 1"),
    ({"should_pad_vocab": False, "vocab_size": 101, "tensor_model_parallel_size": 2}, "vocab_size", "divisible by tensor_model_parallel_size"),
    ({"num_query_groups": 3}, "num_query_groups", "multiple of num_query_groups=3"),
    ({"normalization": "BatchNorm"}, "normalization", "LayerNorm, RMSNorm"),
    ({"activation_func": "silu"}, "activation_func", "must be a callable"),
    ({"position_embedding_type": "alibi"}, "position_embedding_type", "learned_absolute, rope, yarn, mrope, none"),
    ({"rotary_percent": 0.0}, "rotary_percent", "(0, 1]"),
    ({"rotary_percent": 1.5}, "rotary_percent", "(0, 1]"),
    ({"rotary_percent": 0.0625}, "rotary_percent", "1 rotary channels"),
    ({"rotary_base": 0}, "rotary_base", "positive"),
    ({"rope_scaling": True, "position_embedding_type": "yarn"}, "rope_scaling", "'rope' only"),
    ({"rope_scaling_factor": 16.0}, "rope_scaling_factor", "rope_scaling is False"),
    ({"rope_scaling": True, "rope_scaling_factor": 0.5}, "rope_scaling_factor", ">= 1"),
    ({"seq_len_interpolation_factor": 2.0, "position_embedding_type": "yarn"}, "seq_len_interpolation_factor", "ignores it for 'yarn'"),
    ({"seq_len_interpolation_factor": 2.0, "position_embedding_type": "learned_absolute"}, "seq_len_interpolation_factor", "rope and mrope only"),
    ({"seq_len_interpolation_factor": 2.0, "rope_scaling": True}, "seq_len_interpolation_factor", "cannot be combined with rope_scaling"),
    ({"seq_len_interpolation_factor": 0.5}, "seq_len_interpolation_factor", ">= 1"),
    ({"yarn_rotary_scaling_factor": 4.0}, "yarn_rotary_scaling_factor", "only applies to position_embedding_type='yarn'"),
    ({"yarn_beta_fast": 16.0, "position_embedding_type": "none"}, "yarn_beta_fast", "not 'none'"),
    ({"position_embedding_type": "yarn", "rotary_percent": 0.5}, "rotary_percent", "partial rotary"),
    ({"position_embedding_type": "yarn", "rotary_interleaved": True}, "rotary_interleaved", "YaRN"),
    ({"position_embedding_type": "yarn", "yarn_rotary_scaling_factor": 0.0}, "yarn_rotary_scaling_factor", "positive"),
    ({"position_embedding_type": "yarn", "yarn_original_max_position_embeddings": 0}, "yarn_original_max_position_embeddings", "positive"),
    ({"position_embedding_type": "yarn", "yarn_beta_fast": 1.0, "yarn_beta_slow": 32.0}, "yarn_beta_fast", "yarn_beta_fast >= yarn_beta_slow"),
    ({"mrope_section": [2, 3, 3]}, "mrope_section", "only applies to position_embedding_type='mrope'"),
    ({"position_embedding_type": "mrope"}, "mrope_section", "is required"),
    ({"position_embedding_type": "mrope", "mrope_section": [2, 3, 2]}, "mrope_section", "sums to 7 but must equal"),
    ({"position_embedding_type": "mrope", "mrope_section": [4, 4]}, "mrope_section", "3 non-negative integers"),
    ({"position_embedding_type": "mrope", "mrope_section": [2, 3, 3], "rotary_percent": 0.5}, "mrope_section", "= 4"),
    ({"position_embedding_type": "mrope", "mrope_section": [2, 3, 3], "rotary_interleaved": True}, "rotary_interleaved", "multimodal"),
    ({"mtp_num_layers": -1}, "mtp_num_layers", "non-negative integer"),
    ({"mtp_num_layers": 1, "mtp_loss_scaling_factor": -0.1}, "mtp_loss_scaling_factor", ">= 0"),
]


@pytest.mark.parametrize("overrides,field,message", REJECTED, ids=[f"{r[1]}-{i}" for i, r in enumerate(REJECTED)])
def test_finalize_rejects(tiny_config, overrides: dict, field: str, message: str) -> None:
    config = tiny_config(**overrides)
    with pytest.raises(ConfigError) as caught:
        config.finalize()
    assert caught.value.field == field
    assert message in caught.value.rule
    assert f"'GPTModelConfig.{field}'" in str(caught.value)


ACCEPTED = [
    {"position_embedding_type": "learned_absolute", "rotary_base": 500000, "rotary_percent": 0.5},  # harmless, ignored
    {"position_embedding_type": "none", "rotary_interleaved": True},
    {"position_embedding_type": "mrope", "mrope_section": [2, 3, 3], "seq_len_interpolation_factor": 2.0},
    {"position_embedding_type": "mrope", "mrope_section": [1, 1, 2], "rotary_percent": 0.5},
    {"rope_scaling": True, "rope_scaling_factor": 32.0},
    {"position_embedding_type": "yarn", "yarn_rotary_scaling_factor": 40.0, "yarn_mscale_all_dim": 1.0},
    {"mtp_num_layers": 0},
    {"mtp_num_layers": 2, "mtp_loss_scaling_factor": 0.0},
    {"num_query_groups": 1, "qk_layernorm": True, "normalization": "LayerNorm"},
]


@pytest.mark.parametrize("overrides", ACCEPTED)
def test_finalize_accepts(tiny_config, overrides: dict) -> None:
    assert tiny_config(**overrides).finalize().transformer is not None


def test_build_model_finalizes_first(tiny_config, plugtron_single_rank) -> None:
    from plugtron.pipeline import build_model

    with pytest.raises(ConfigError, match="mrope_section"):
        build_model(tiny_config(position_embedding_type="mrope"))


@given(
    vocab=st.integers(1, 300_000),
    divisible=st.sampled_from([1, 8, 64, 128]),
    tp=st.sampled_from([1, 2, 4, 8]),
)
def test_padded_vocab_is_the_next_multiple(vocab: int, divisible: int, tp: int) -> None:
    config = GPTModelConfig(vocab_size=vocab, make_vocab_size_divisible_by=divisible, tensor_model_parallel_size=tp)
    padded = config.padded_vocab_size()
    assert padded % (divisible * tp) == 0 and vocab <= padded < vocab + divisible * tp
    config.should_pad_vocab = False
    assert config.padded_vocab_size() == vocab


def test_built_vocab_is_padded(tiny_config, build) -> None:
    model = build(tiny_config(vocab_size=100)).chunks[0]
    assert model.embedding.word_embeddings.weight.shape[0] == 128
    assert model.output_layer.weight.shape[0] == 128
    unpadded = build(tiny_config(vocab_size=100, should_pad_vocab=False)).chunks[0]
    assert unpadded.embedding.word_embeddings.weight.shape[0] == 100


@pytest.mark.parametrize("overrides,dim", [({}, 16), ({"rotary_percent": 0.5}, 8), ({"kv_channels": 32}, 32), ({"kv_channels": 32, "rotary_percent": 0.25}, 8)])
def test_rotary_dim(tiny_config, overrides: dict, dim: int) -> None:
    assert tiny_config(**overrides).rotary_dim() == dim
