"""The config defaults each GPT architecture keeps as data (``<ARCH>.schema``) agree with the installed transformers.

Reading a config.json does not import transformers (1.5-3.5 s); these tests are
what keeps the copy of its defaults honest: a transformers release that changes a
default, a declared type or a derivation fails here, not silently in a converted
model. Every architecture of :data:`plugtron_gpt.hf.catalogue.ARCHITECTURES` is
checked, so one added to the catalogue is covered without editing this file.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from typing import Any

import pytest
import transformers

from plugtron.conversion import BOOL, FLOAT, INT, OPT_FLOAT, OPT_INT, STR
from plugtron.conversion.hf_keys import COMMON_TYPES
from plugtron_gpt.hf import catalogue
from plugtron_hf_bridge.errors import UnsupportedConfigError

ARCHITECTURES = list(catalogue.ARCHITECTURES)

#: Sizes of a small model, for whichever of these keys an architecture's schema reads.
SMALL = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 100, "max_position_embeddings": 64,
         "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 16, "n_inner": 128}

#: Variations on the small model, each ``(key, changes)``: applied to the architectures whose schema reads ``key``.
VARIATIONS: list[tuple[str, dict[str, Any]]] = [
    ("num_key_value_heads", {"num_key_value_heads": None}),
    ("head_dim", {"head_dim": 32, "tie_word_embeddings": True, "rms_norm_eps": 1e-5}),
    ("hidden_act", {"hidden_act": "gelu", "attention_bias": True, "mlp_bias": True}),
    ("sliding_window", {"sliding_window": None}),
    ("sliding_window", {"sliding_window": 32}),
    ("use_sliding_window", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2}),
    ("use_sliding_window", {"use_sliding_window": False, "sliding_window": 16}),
    ("use_sliding_window", {"use_sliding_window": True, "sliding_window": None}),
    ("layer_types", {"layer_types": ["full_attention", "sliding_attention"] * 2, "use_sliding_window": True}),
    ("n_inner", {"n_inner": None, "tie_word_embeddings": False, "activation_function": "gelu",
                 "layer_norm_epsilon": 1e-6}),
]

#: How transformers annotates a config field -> the type a schema declares for it.
ANNOTATIONS = {"int": INT, "int | None": OPT_INT, "float": FLOAT, "float | None": OPT_FLOAT, "bool": BOOL, "str": STR}


def spec(arch: str) -> Any:
    """The :class:`~plugtron_gpt.hf.architecture.HFArchitecture` of ``arch``.

    Skipped only while its module, listed in the catalogue, is still being written:
    any other import error fails, and once every module exists nothing is skipped.
    """
    listed = {f"plugtron_gpt.hf.{module}" for module, _ in catalogue.ARCHITECTURES.values()}
    try:
        return catalogue.adapter(arch).spec
    except ModuleNotFoundError as missing:  # this module, or a listed one it derives from
        if missing.name not in listed:
            raise
        pytest.skip(f"{missing.name} (listed in plugtron_gpt.hf.catalogue.ARCHITECTURES) is not written yet")


def config_class(arch: str) -> type:
    return getattr(transformers, spec(arch).config_class)


def cases(arch: str) -> list[dict[str, Any]]:
    """The configs whose resolution is compared key by key: the class defaults, a small model, variations."""
    defaults = spec(arch).schema.defaults
    small = {key: value for key, value in SMALL.items() if key in defaults}
    return [{}, small] + [{**small, **changes} for key, changes in VARIATIONS if key in defaults]


def theirs(arch: str, cfg: dict[str, Any]) -> Any:
    return config_class(arch).from_dict(dict(cfg))


def declared_fields(cls: type) -> dict[str, dataclasses.Field]:
    assert dataclasses.is_dataclass(cls), f"{cls.__name__} is no longer a dataclass; read its defaults another way"
    return {f.name: f for f in dataclasses.fields(cls)}


def annotation(field: dataclasses.Field) -> str:
    """The field's declared type as written (``"int"``, ``"int | None"`` ...), whether stored as a type or a string."""
    hint = field.type
    return hint if isinstance(hint, str) else hint.__name__ if isinstance(hint, type) else str(hint)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_default_and_derived_value_matches_transformers(arch: str) -> None:
    """Each case resolves to what the config class holds, or is refused by both (naming the key)."""
    schema = spec(arch).schema
    for cfg in cases(arch):
        try:
            reference = theirs(arch, cfg)
        except Exception:  # noqa: BLE001 - transformers' own validation errors vary in type
            with pytest.raises(UnsupportedConfigError):
                schema.resolve(cfg)
            continue
        ours = schema.resolve(cfg)
        for key in [*schema.defaults, "layer_types"]:
            expected = getattr(reference, key, cfg.get(key))
            assert ours.get(key) == expected, (arch, cfg, key, ours.get(key), expected)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_defaults_are_the_class_defaults(arch: str) -> None:
    """No key's default is copied wrongly: each equals the class's declared default (before any derivation),
    value and type alike (``1`` is not ``1.0``)."""
    cls = config_class(arch)
    declared = declared_fields(cls)
    for key, value in spec(arch).schema.defaults.items():
        if key not in declared:  # a plain attribute the class keeps only when given: resolution test above
            continue
        field = declared[key]
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        assert type(default) is type(value) and default == value, (arch, key, value, default)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_declared_types_are_the_class_types(arch: str) -> None:
    """The type a schema checks a key against is the one transformers declares for it."""
    schema = spec(arch).schema
    cls = config_class(arch)
    declared = declared_fields(cls)
    ours = {**COMMON_TYPES, **schema.types}
    for key in schema.defaults:
        if key not in declared or key not in ours:
            continue
        kind = ANNOTATIONS.get(annotation(declared[key]))
        if kind is not None:
            assert ours[key] == kind, (arch, key, ours[key], declared[key].type)


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
    defaults = spec(arch).schema.defaults
    cfg = {**{k: v for k, v in SMALL.items() if k in defaults}, key: value}
    with pytest.raises(Exception):
        theirs(arch, cfg)
    with pytest.raises(UnsupportedConfigError) as info:
        spec(arch).schema.resolve(cfg)
    assert info.value.field == key


def test_reading_a_config_imports_neither_torch_nor_transformers(tmp_path) -> None:
    cfg = theirs("LlamaForCausalLM", {k: v for k, v in SMALL.items() if k in spec("LlamaForCausalLM").schema.defaults})
    (tmp_path / "config.json").write_text(cfg.to_json_string())
    script = ("import sys; from plugtron_hf_bridge.hf_config import read_hf_config; "
              "from plugtron_gpt.hf.catalogue import to_megatron_fields; "
              f"to_megatron_fields(read_hf_config({str(tmp_path)!r}), 'LlamaForCausalLM'); "
              "print(sorted(m for m in ('torch', 'transformers', 'megatron') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout
