"""Per-call wrap hooks reach ``build_model``: they run after the plugins' hooks, in list order."""

from __future__ import annotations

import warnings

import pytest

from plugtron import PipelineError, hookimpl
from plugtron.builder import BuildOptions
from plugtron.pipeline import build_model

warnings.filterwarnings("ignore", module=r"megatron\.")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _tiny_gpt(**overrides):
    import torch
    from plugtron_gpt.config import GPTModelConfig

    fields = dict(
        num_layers=1, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64, vocab_size=64,
        make_vocab_size_divisible_by=64, seq_length=8, normalization="RMSNorm", add_bias_linear=False,
        activation_func=torch.nn.functional.silu, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, layer_spec="local",
    )
    return GPTModelConfig(**{**fields, **overrides})


class _PluginHooks:
    """An installed plugin's wrap hooks, recording what they saw."""

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    @hookimpl
    def plugtron_pre_wrap(self, model, config, context):
        self.calls.append(f"plugin pre: {type(model[0]).__name__}")

    @hookimpl
    def plugtron_post_wrap(self, model, config, context):
        self.calls.append(f"plugin post: {type(model[0]).__name__}")


def test_build_model_runs_per_call_hooks_after_the_plugins_in_list_order(plugtron_single_rank, plugtron_manager_factory):
    import torch

    calls: list[str] = []
    pm = plugtron_manager_factory(env={"PLUGTRON_PLUGINS": "gpt"}, plugins=[("recorder", _PluginHooks(calls))])

    def first_pre(model, config, context):
        calls.append(f"first pre: {type(model[0]).__name__}")
        return [torch.nn.Sequential(model[0])]  # a returned list replaces the chunks

    def second_pre(model, config, context):
        calls.append(f"second pre: {type(model[0]).__name__}")

    def post(model, config, context):
        calls.append(f"post: {type(model[0]).__name__} on {context.device}")

    built = build_model(
        _tiny_gpt(bf16=True, params_dtype=torch.bfloat16), parallel=plugtron_single_rank, pm=pm,
        options=BuildOptions(print_report=False), pre_wrap_hooks=[first_pre, second_pre], post_wrap_hooks=[post],
    )
    assert calls == [
        "plugin pre: GPTModel",
        "first pre: GPTModel",
        "second pre: Sequential",
        # post-wrap hooks see what the pipeline wrapped (here megatron's Float16Module, step 5)
        "plugin post: Float16Module",
        "post: Float16Module on cpu",
    ]
    assert built.context.builder.pre_wrap_hooks == [first_pre, second_pre]


@pytest.mark.parametrize("hooks", [lambda m, c, x: None, [print, "not a function"]])
def test_build_model_refuses_hooks_that_are_not_a_list_of_functions(hooks, plugtron_manager):
    with pytest.raises(PipelineError, match=r"build_model\(pre_wrap_hooks=\.\.\.\) takes a list of functions"):
        build_model(object(), pm=plugtron_manager, pre_wrap_hooks=hooks)
