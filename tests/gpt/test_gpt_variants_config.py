"""Architecture-variant fields: what validation refuses, which specs refuse what, and ``auto``.

Every refusal is one line naming the field (``ConfigError.field``) and, for a
spec, the spec. Nothing here builds a model.
"""

from __future__ import annotations

import pytest
import plugtron_gpt.plugin
import plugtron_gpt.specs as specs
from plugtron import LayerSpecError, availability
from plugtron.errors import ConfigError

WINDOW = dict(window_size=[3, 0])


@pytest.mark.parametrize(
    "overrides,field,rule",
    [
        (dict(attention_softcap=0.0), "attention_softcap", "positive"),
        (dict(final_logit_softcap=-1.0), "final_logit_softcap", "positive"),
        (dict(logits_divisor=float("inf")), "logits_divisor", "positive"),
        (dict(residual_multiplier=float("nan")), "residual_multiplier", "finite"),
        (dict(embedding_multiplier_cast=True), "embedding_multiplier_cast", "embedding_multiplier is not"),
        (dict(embedding_multiplier=2.0, position_embedding_type="learned_absolute"), "embedding_multiplier", "learned_absolute"),
        (dict(window_size=[3, 1]), "window_size", "(left >= 0, 0)"),
        (dict(window_size=[-1, 0]), "window_size", "(left >= 0, 0)"),
        (dict(window_size=[3]), "window_size", "two integers"),
        (dict(window_attn_skip_freq=2), "window_attn_skip_freq", "window_size is not"),
        (dict(WINDOW, window_attn_skip_freq=0), "window_attn_skip_freq", "positive integer"),
        (dict(WINDOW, window_attn_skip_freq=[1, 2]), "window_attn_skip_freq", "one 0/1 entry per layer (2)"),
        (dict(WINDOW, window_attn_skip_freq=[1, 0, 1]), "window_attn_skip_freq", "per layer"),
        (dict(norm_placement="middle"), "norm_placement", "pre, sandwich, post"),
        (dict(qk_norm_scope="full"), "qk_norm_scope", "needs qk_layernorm"),
        (dict(qk_norm_scope="full", qk_layernorm=True, normalization="LayerNorm"), "qk_norm_scope", "RMSNorm only"),
        (dict(qk_norm_scope="row"), "qk_norm_scope", "head, full"),
        (dict(rotary_base_local=10000.0), "rotary_base_local", "window_size is not set"),
        (dict(WINDOW, rotary_base_local=10000.0, position_embedding_type="yarn"), "rotary_base_local", "'rope'"),
        (dict(WINDOW, window_attn_skip_freq=[1, 0], mtp_num_layers=1), "window_attn_skip_freq", "MTP"),
        (dict(no_rope_freq=[0, 1], mtp_num_layers=1), "no_rope_freq", "MTP"),
    ],
)
def test_validation_refuses(tiny_config, overrides: dict, field: str, rule: str) -> None:
    with pytest.raises(ConfigError) as caught:
        tiny_config(**overrides).finalize()
    assert caught.value.field == field and rule in caught.value.rule, str(caught.value)
    assert "\n" not in str(caught.value)


LAYER_VARIANTS = {
    "window_size": dict(WINDOW),
    "attention_softcap": dict(attention_softcap=30.0),
    "layernorm_zero_centered_gamma": dict(layernorm_zero_centered_gamma=True),
    "norm_placement": dict(norm_placement="sandwich"),
    "residual_multiplier": dict(residual_multiplier=0.5),
    "qk_norm_scope": dict(qk_layernorm=True, qk_norm_scope="full"),
    "rotary_base_local": dict(WINDOW, rotary_base_local=10000.0),
}


@pytest.mark.parametrize("field", sorted(LAYER_VARIANTS))
def test_named_local_spec_is_refused_at_validation(tiny_config, field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        tiny_config(layer_spec="local", **LAYER_VARIANTS[field]).finalize()
    message = str(caught.value)
    assert caught.value.field == field and "layer spec 'local' does not implement" in message and f"{field} (" in message


@pytest.mark.parametrize("field", sorted(LAYER_VARIANTS))
def test_spec_factories_refuse_what_they_lack(tiny_config, field: str) -> None:
    """The factories check too (``auto`` reaches them without a named spec); te is refused before any TE import."""
    config = tiny_config(**LAYER_VARIANTS[field]).finalize()
    te_has_it = field in ("window_size", "layernorm_zero_centered_gamma")
    for name, factory in (("local", specs.local_spec), ("modelopt", specs.modelopt_spec), ("te", specs.te_spec), ("te_full", specs.te_full_spec)):
        if name.startswith("te") and te_has_it:
            continue
        with pytest.raises(LayerSpecError, match=f"layer spec '{name}' does not implement .*{field} \\("):
            factory(config)


def test_model_level_variants_are_accepted_by_every_spec(tiny_config) -> None:
    from plugtron_gpt.features import unsupported

    config = tiny_config(final_logit_softcap=30.0, logits_divisor=2.0, embedding_multiplier=3.0, no_rope_freq=[0, 1], rotary_percent=0.5).finalize()
    assert all(unsupported(config, name) == [] for name in ("te", "te_full", "torch", "local", "modelopt"))


@pytest.fixture
def gpu_pm(plugtron_manager_factory, monkeypatch):
    """Only the GPT plugin, on a pretend machine with transformer-engine and CUDA."""
    monkeypatch.setattr(availability, "module_present", lambda module: module in {"transformer_engine"})
    monkeypatch.setattr(availability, "cuda_present", lambda: True)
    return plugtron_manager_factory(load_entrypoints=False, plugins=[("gpt", plugtron_gpt.plugin)])


@pytest.mark.parametrize("overrides,expected", [({}, "te"), (WINDOW, "te"), (dict(attention_softcap=30.0), "torch"),
                                                (dict(norm_placement="post"), "torch")])
def test_auto_skips_specs_lacking_a_variant(tiny_config, gpu_pm, overrides: dict, expected: str) -> None:
    from plugtron_gpt.builder import GPTModelBuilder

    builder = GPTModelBuilder(tiny_config(**overrides).finalize())
    choice = builder.select_spec(gpu_pm)
    assert choice.info.name == expected and builder.spec_choice is choice
    if expected == "torch":
        assert "te: lacks" in choice.reason and "te_full: lacks" in choice.reason


def test_full_scope_keeps_qk_layernorm_off_in_megatrons_config(tiny_config) -> None:
    """megatron's finalize_model_grads would sum the TP-sharded full-width weights by name otherwise."""
    from plugtron.config import from_dict, to_dict

    config = tiny_config(qk_layernorm=True, qk_norm_scope="full").finalize()
    assert config.qk_layernorm is True and config.transformer.qk_layernorm is False
    saved = to_dict(config)
    assert saved["qk_layernorm"] is True and saved["qk_norm_scope"] == "full"
    assert from_dict(saved) == config
    assert tiny_config(qk_layernorm=True).finalize().transformer.qk_layernorm is True


def test_window_size_reaches_megatron_as_a_tuple(tiny_config) -> None:
    config = tiny_config(window_size=[3, 0], window_attn_skip_freq=[1, 0]).finalize()
    assert config.transformer.window_size == (3, 0) and config.transformer.window_attn_skip_freq == [1, 0]
