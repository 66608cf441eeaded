"""Model configs: exact save/load round trips and the errors users see."""

from __future__ import annotations

import functools
import json
import re
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plugtron import ConfigError, PlugtronPluginManager, UnknownFamilyError
from plugtron.config import DEFAULT_FILENAME, from_dict, load, save, to_dict
from plugtron_example.config import ToyConfig
from plugtron_gpt.config import GPTModelConfig

# megatron-core and torch announce optional packages and deprecations on import
pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:megatron"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


@pytest.fixture(scope="module")
def pm():
    return PlugtronPluginManager(env={"PLUGTRON_PLUGINS": "gpt,example"})


def _gpt(**overrides) -> GPTModelConfig:
    fields = dict(
        num_layers=4,
        hidden_size=64,
        num_attention_heads=8,
        num_query_groups=2,
        vocab_size=1000,
        seq_length=128,
        activation_func=torch.nn.functional.silu,
        gated_linear_unit=True,
        init_method=functools.partial(torch.nn.init.normal_, mean=0.0, std=0.01),
        params_dtype=torch.bfloat16,
        bf16=True,
        normalization="RMSNorm",
        layernorm_epsilon=1e-5,
        position_embedding_type="rope",
        rotary_base=500000,
    )
    fields.update(overrides)
    return GPTModelConfig(**fields)


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_gpt_config_round_trips_exactly(tmp_path, pm, suffix):
    config = _gpt()
    path = save(config, tmp_path / f"model{suffix}")
    loaded = load(path, pm)
    assert type(loaded) is GPTModelConfig
    assert loaded == config
    assert to_dict(loaded) == to_dict(config)
    assert loaded.activation_func is torch.nn.functional.silu
    assert isinstance(loaded.init_method, functools.partial)
    assert loaded.init_method.func is torch.nn.init.normal_
    assert (loaded.init_method.args, loaded.init_method.keywords) == ((), {"mean": 0.0, "std": 0.01})
    assert loaded.params_dtype is torch.bfloat16
    assert loaded.bf16 is True
    assert (loaded.vocab_size, loaded.seq_length, loaded.rotary_base, loaded.num_query_groups) == (1000, 128, 500000, 2)
    assert loaded.transformer_kwargs.keys() == config.transformer_kwargs.keys()
    # the derived values megatron computes agree too
    config.finalize()
    loaded.finalize()
    assert loaded.ffn_hidden_size == config.ffn_hidden_size == 256
    assert loaded.transformer.init_method.keywords == {"mean": 0.0, "std": 0.01}


def test_saved_file_records_the_family_and_short_forms(tmp_path):
    data = json.loads(save(_gpt(), tmp_path / "model.json").read_text())
    assert data["family"] == "gpt"
    assert next(iter(data)) == "family"
    assert data["activation_func"] == "torch.nn.functional:silu"
    assert data["init_method"] == {"function": "torch.nn.init:normal_", "args": [], "kwargs": {"mean": 0.0, "std": 0.01}}
    assert data["params_dtype"] == "bfloat16"
    assert "ffn_hidden_size" not in data  # derived, not set: recomputed on load
    assert yaml.safe_load(save(_gpt(), tmp_path / "model.yaml").read_text()) == data


def test_save_into_a_directory_uses_the_default_name(tmp_path, pm):
    path = save(_gpt(), tmp_path)
    assert path == tmp_path / DEFAULT_FILENAME
    assert load(tmp_path, pm) == _gpt()


def test_hand_written_yaml_with_short_forms_loads(tmp_path, pm):
    path = tmp_path / "hand.yaml"
    path.write_text(
        "family: toy\n"
        "vocab_size: 512\n"
        "num_layers: 2\n"
        "hidden_size: 32\n"
        "num_attention_heads: 4\n"
        "params_dtype: torch.float16\n"
        "activation_func: torch.nn.functional:gelu\n"
    )
    config = load(path, pm)
    assert type(config) is ToyConfig
    assert (config.vocab_size, config.seq_length) == (512, 64)
    assert config.params_dtype is torch.float16
    assert config.activation_func is torch.nn.functional.gelu


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    vocab_size=st.integers(1, 2**20),
    seq_length=st.integers(1, 2**16),
    rotary_percent=st.floats(min_value=0.0, max_value=1.0, exclude_min=True),
    share=st.booleans(),
    num_layers=st.integers(1, 64),
    hidden_dropout=st.floats(0.0, 1.0),
    layernorm_epsilon=st.floats(min_value=1e-12, max_value=1.0),
    add_bias_linear=st.booleans(),
    yaml_format=st.booleans(),
)
def test_numeric_and_bool_fields_round_trip(pm, vocab_size, seq_length, rotary_percent, share, num_layers,
                                            hidden_dropout, layernorm_epsilon, add_bias_linear, yaml_format):
    config = GPTModelConfig(
        num_layers=num_layers, hidden_size=64, num_attention_heads=4, vocab_size=vocab_size, seq_length=seq_length,
        rotary_percent=rotary_percent, share_embeddings_and_output_weights=share, hidden_dropout=hidden_dropout,
        layernorm_epsilon=layernorm_epsilon, add_bias_linear=add_bias_linear,
    )
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load(save(config, Path(tmp) / ("c.yaml" if yaml_format else "c.json")), pm)
    assert loaded == config
    assert (loaded.rotary_percent, loaded.hidden_dropout, loaded.layernorm_epsilon) == (rotary_percent, hidden_dropout, layernorm_epsilon)
    assert (loaded.share_embeddings_and_output_weights, loaded.add_bias_linear) == (share, add_bias_linear)
    assert from_dict(to_dict(config), pm) == config


# -- errors ------------------------------------------------------------------------------


def test_heads_not_divisible_by_tensor_parallel_size(pm):
    config = _gpt(num_attention_heads=6, num_query_groups=None, tensor_model_parallel_size=4)
    with pytest.raises(ConfigError, match=re.escape(
        "config field 'GPTModelConfig.num_attention_heads': 6 heads must be divisible by tensor_model_parallel_size=4"
    )) as info:
        config.finalize()
    assert (info.value.field, info.value.rule) == ("num_attention_heads", "6 heads must be divisible by tensor_model_parallel_size=4")


def test_unknown_field_in_a_file_names_it_and_suggests(tmp_path, pm):
    path = tmp_path / "typo.json"
    data = to_dict(_gpt())
    data["hiden_size"] = data.pop("hidden_size")
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=re.escape(
        f"config field 'GPTModelConfig.hiden_size': unknown field in {path} (did you mean 'hidden_size'?)"
    )) as info:
        load(path, pm)
    assert info.value.field == "hiden_size"


def test_unknown_keyword_in_code_names_it_and_suggests():
    with pytest.raises(ConfigError, match=re.escape(
        "config field 'ToyConfig.vocab_sise': is neither a field of ToyConfig nor of megatron's TransformerConfig "
        "(did you mean 'vocab_size'?)"
    )):
        ToyConfig(vocab_sise=3, num_layers=1, hidden_size=8, num_attention_heads=1)


def test_setting_an_unknown_attribute_names_it():
    config = ToyConfig(num_layers=1, hidden_size=8, num_attention_heads=1)
    with pytest.raises(ConfigError, match=re.escape("config field 'ToyConfig.num_layer': is not a config field (did you mean 'num_layers'?)")):
        config.num_layer = 2


def test_file_without_a_family_is_an_error(tmp_path, pm):
    path = tmp_path / "nofamily.yaml"
    path.write_text("num_layers: 2\nhidden_size: 8\n")
    with pytest.raises(ConfigError, match=re.escape(f"config field 'family': {path} does not say which model family it is for")):
        load(path, pm)


def test_file_with_an_unknown_family_is_an_error(tmp_path, pm):
    path = tmp_path / "mamba.json"
    path.write_text(json.dumps({"family": "hyena", "num_layers": 2}))
    with pytest.raises(UnknownFamilyError, match=r"^no plugin provides model family 'hyena' \(installed families: gpt, toy\); "
                                                 r"install its plugin, e\.g\. pip install plugtron-hyena$"):
        load(path, pm)


def test_invalid_value_names_the_field(tmp_path, pm):
    path = tmp_path / "dtype.json"
    path.write_text(json.dumps({"family": "gpt", "vocab_size": 8, "params_dtype": "bfloat17"}))
    with pytest.raises(ConfigError, match=re.escape("config field 'GPTModelConfig.params_dtype': invalid value 'bfloat17' in")):
        load(path, pm)


def test_unreadable_and_malformed_files(tmp_path, pm):
    with pytest.raises(ConfigError, match=r"config field 'path': cannot read config file .*missing\.json"):
        load(tmp_path / "missing.json", pm)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=re.escape(f"config field 'path': {bad} is not valid JSON")):
        load(bad, pm)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=re.escape(f"{listed} must hold a mapping of field names to values")):
        load(listed, pm)


def test_lambdas_cannot_be_saved(tmp_path):
    config = _gpt(activation_func=lambda x: x)
    with pytest.raises(ValueError, match="has no importable path"):
        save(config, tmp_path / "lambda.json")
    assert not (tmp_path / "lambda.json").exists()


def test_toy_config_validation_and_round_trip(tmp_path, pm):
    config = ToyConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=300, seq_length=16)
    assert load(save(config, tmp_path / "toy.yaml"), pm) == config
    config.seq_length = 0
    with pytest.raises(ConfigError, match=re.escape("config field 'ToyConfig.seq_length': must be a positive integer")):
        config.finalize()
