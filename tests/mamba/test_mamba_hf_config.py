"""Config translation of the Mamba HF converters: round trips, strictness, registration.

A key that changes the numbers must be translated or refused by name; what
megatron cannot express must fail with the field named, in both directions.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
import torch.nn.functional as F

from plugtron_hf_bridge.errors import UnsupportedConfigError
from plugtron_mamba.hf.adapters import MAMBA2, NEMOTRON_H
from plugtron_mamba.hf.config import decode_floats
from plugtron_mamba.hf.tiny import tiny_hf_config

_NOISE = {"transformers_version", "_name_or_path", "architectures", "dtype"}


def _hf_dict(adapter: Any, **kwargs: Any) -> dict[str, Any]:
    """What config.json holds: the non-default keys, plus architectures (as save_pretrained writes)."""
    cfg = tiny_hf_config(adapter.architecture, **kwargs)
    return {**json.loads(cfg.to_json_string(use_diff=True)), "architectures": [adapter.architecture]}


def _canonical(adapter: Any, hf: dict[str, Any]) -> dict[str, Any]:
    import transformers

    cls = getattr(transformers, adapter.architecture.replace("ForCausalLM", "Config"))
    full = cls.from_dict(decode_floats(dict(hf))).to_dict()
    return {k: v for k, v in full.items() if k not in _NOISE}


@pytest.mark.parametrize("adapter,kwargs", [(MAMBA2, {}), (MAMBA2, {"tied": True, "layers": 2}),
                                            (NEMOTRON_H, {}), (NEMOTRON_H, {"pattern": "*M-"})])
def test_config_round_trip(adapter, kwargs) -> None:
    hf = _hf_dict(adapter, **kwargs)
    config = adapter.config_from_hf(hf)
    config.finalize()
    back = adapter.config_to_hf(config, passthrough=hf)
    assert back["architectures"] == [adapter.architecture]
    assert _canonical(adapter, back) == _canonical(adapter, hf)
    assert adapter.config_from_hf(back) == config
    bare = adapter.config_to_hf(config)  # without the source file the numbers are the same
    assert adapter.config_from_hf(bare) == config


def test_mamba2_fields() -> None:
    config = MAMBA2.config_from_hf(_hf_dict(MAMBA2, tied=True)).finalize()
    assert config.layer_pattern() == "MMM" and config.share_embeddings_and_output_weights
    assert config.mamba_sizes() == {"heads": 8, "head_dim": 16, "groups": 2, "state": 16, "inner": 128}
    assert (config.mamba_chunk_size, config.mamba_conv_kernel, config.normalization) == (8, 4, "RMSNorm")
    assert config.position_embedding_type == "none" and config.hidden_dropout == 0.0


def test_nemotron_h_fields() -> None:
    from megatron.core.activations import squared_relu

    config = NEMOTRON_H.config_from_hf(_hf_dict(NEMOTRON_H)).finalize()
    assert config.layer_pattern() == "M*-M-*M" and not config.share_embeddings_and_output_weights
    assert (config.num_attention_heads, config.num_query_groups, config.kv_channels) == (4, 2, 16)
    assert config.activation_func is squared_relu and not config.gated_linear_unit and not config.add_bias_linear
    assert config.position_embedding_type == "none" and config.ffn_hidden_size == 96 and config.seq_length == 64


def test_nemotron_h_legacy_spelling_gives_the_same_model() -> None:
    modern = _hf_dict(NEMOTRON_H, chunk_size=16)
    legacy = {k: v for k, v in modern.items() if k not in ("layers_block_type", "n_groups", "chunk_size")}
    legacy.update(hybrid_override_pattern="M*-M-*M", mamba_n_groups=2, mamba_chunk_size=16, num_hidden_layers=7,
                  rms_norm_eps=1e-5, time_step_rank=4)
    assert NEMOTRON_H.config_from_hf(legacy) == NEMOTRON_H.config_from_hf(modern)


def test_nemotron_h_tie_word_embeddings_is_ignored_like_transformers_does() -> None:
    config = NEMOTRON_H.config_from_hf({**_hf_dict(NEMOTRON_H), "tie_word_embeddings": True})
    assert not config.share_embeddings_and_output_weights


@pytest.mark.parametrize("adapter,key,value", [
    (MAMBA2, "some_new_knob", 3),
    (MAMBA2, "use_bias", True),
    (MAMBA2, "use_conv_bias", False),
    (MAMBA2, "hidden_act", "gelu"),
    (MAMBA2, "layer_norm_epsilon", 1e-6),
    (MAMBA2, "time_step_limit", [0.0, 10.0]),
    (NEMOTRON_H, "mlp_hidden_act", "silu"),
    (NEMOTRON_H, "mlp_bias", True),
    (NEMOTRON_H, "mamba_hidden_act", "gelu"),
    (NEMOTRON_H, "num_nextn_predict_layers", 1),
    (NEMOTRON_H, "sliding_window", 16),
    (NEMOTRON_H, "layer_norm_epsilon", 1e-6),
    (NEMOTRON_H, "model_type", "mamba2"),
    (NEMOTRON_H, "unknown_scale", 0.5),
])
def test_import_refuses_what_it_cannot_reproduce(adapter, key, value) -> None:
    with pytest.raises(UnsupportedConfigError) as info:
        adapter.config_from_hf({**_hf_dict(adapter), key: value}, source="x/config.json")
    assert info.value.field == key and key in str(info.value) and "x/config.json" in str(info.value)


@pytest.mark.parametrize("adapter,overrides,field", [
    (MAMBA2, {"hybrid_override_pattern": "M*M", "num_attention_heads": 4}, "hybrid_override_pattern"),
    (MAMBA2, {"normalization": "LayerNorm"}, "normalization"),
    (MAMBA2, {"layernorm_epsilon": 1e-6}, "layernorm_epsilon"),
    (MAMBA2, {"position_embedding_type": "learned_absolute"}, "position_embedding_type"),
    (NEMOTRON_H, {"share_embeddings_and_output_weights": True}, "share_embeddings_and_output_weights"),
    (NEMOTRON_H, {"gated_linear_unit": True}, "gated_linear_unit"),
    (NEMOTRON_H, {"activation_func": F.gelu}, "activation_func"),
    (NEMOTRON_H, {"add_bias_linear": True}, "add_bias_linear"),
    (NEMOTRON_H, {"layernorm_zero_centered_gamma": True}, "layernorm_zero_centered_gamma"),
])
def test_export_refuses_what_hf_cannot_express(adapter, overrides, field) -> None:
    from plugtron_mamba.config import MambaModelConfig

    config = adapter.config_from_hf(_hf_dict(adapter))
    kwargs = {**config.transformer_kwargs, **{k: getattr(config, k) for k in (
        "hybrid_override_pattern", "mamba_expand", "mamba_conv_kernel", "mamba_chunk_size", "vocab_size",
        "seq_length", "share_embeddings_and_output_weights", "position_embedding_type")}, **overrides}
    changed = MambaModelConfig(**kwargs).finalize()
    with pytest.raises(UnsupportedConfigError) as info:
        adapter.config_to_hf(changed)
    assert info.value.field == field


@pytest.mark.parametrize("adapter", [MAMBA2, NEMOTRON_H])
def test_tables_are_full_size_at_any_tensor_parallel_size(adapter) -> None:
    """The tables describe whole tensors; the bridge cuts each rank's rows with the family's
    block layout (parity at TP=2: tests/hf_bridge/test_hfb_multirank.py). Only megatron's
    vocabulary padding depends on TP. TP must divide both the Mamba heads and the groups,
    and a config that breaks this fails by name."""
    from plugtron.errors import ConfigError

    def table(tp: int) -> list[tuple]:
        config = adapter.config_from_hf(_hf_dict(adapter))
        config.tensor_model_parallel_size = tp
        config.finalize()
        vocab = ("embedding.word_embeddings.weight", "output_layer.weight")
        return [(m.hf_names, m.megatron_name, m.hf_shapes, m.megatron_shape[1:] if m.megatron_name in vocab
                 else m.megatron_shape) for m in adapter.tensor_mappings(config)]

    assert table(2) == table(1)
    with pytest.raises(ConfigError, match="divisible by tensor_model_parallel_size=4"):
        table(4)  # 8 heads, 2 groups


def test_converters_are_registered_and_load_through_the_bridge() -> None:
    from plugtron.manager import PlugtronPluginManager
    from plugtron_hf_bridge.adapter import HFAdapter, load_adapter

    pm = PlugtronPluginManager()
    for adapter in (MAMBA2, NEMOTRON_H):
        info = pm.converter("hf", adapter.architecture)
        assert info.family == "mamba" and info.distribution == "plugtron-mamba"
        loaded = load_adapter(adapter.architecture, pm)
        assert loaded is adapter and isinstance(loaded, HFAdapter) and loaded.family == "mamba"


def test_plugin_and_adapter_modules_need_neither_torch_nor_the_bridge() -> None:
    code = (
        "import sys; sys.modules['plugtron_hf_bridge'] = None\n"
        "import plugtron_mamba.plugin as p, plugtron_mamba.hf.adapters as a\n"
        "infos = p.plugtron_register_converters()\n"
        "assert [i.adapter for i in infos] == ['plugtron_mamba.hf.adapters:MAMBA2', 'plugtron_mamba.hf.adapters:NEMOTRON_H']\n"
        "assert a.MAMBA2.family == 'mamba' and a.NEMOTRON_H.hf_model_class == 'transformers:NemotronHForCausalLM'\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
