"""Layer spec selection for the GPT family, and what each CPU-capable spec builds.

The availability checks are real (``importlib.util.find_spec`` and
``torch.cuda.is_available``). To see what ``auto`` does on a machine with
transformer-engine and CUDA, only those two probes are replaced
(``plugtron.availability.module_present`` / ``cuda_present``); megatron itself is never faked, so
these tests only *select* GPU specs and never build them.
"""

from __future__ import annotations

import pytest
import torch

import plugtron_gpt.plugin
import plugtron_gpt.specs as specs
from plugtron import LayerSpecError, PlugtronPluginManager, availability
from plugtron.layer_specs import select_layer_spec


@pytest.fixture
def pm(plugtron_manager_factory) -> PlugtronPluginManager:
    """A manager holding only the GPT plugin, so other plugins' specs cannot change the choice."""
    return plugtron_manager_factory(load_entrypoints=False, plugins=[("gpt", plugtron_gpt.plugin)])


@pytest.fixture
def machine(monkeypatch):
    """``machine(modules={...}, cuda=bool)``: pretend these modules are installed and CUDA is (not) there."""

    def pretend(modules: set[str], cuda: bool) -> None:
        monkeypatch.setattr(availability, "module_present", lambda module: module in modules)
        monkeypatch.setattr(availability, "cuda_present", lambda: cuda)

    return pretend


def test_priorities_put_gpu_specs_first(pm) -> None:
    assert [info.name for info in pm.layer_specs("gpt")] == ["te", "te_full", "torch", "local", "modelopt"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
def test_auto_picks_torch_on_this_machine(pm) -> None:
    choice = select_layer_spec(pm, "gpt", "auto")
    assert choice.info.name == "torch"
    assert "skipped te: transformer_engine" in choice.reason
    assert "modelopt" not in choice.reason, "specs below the winner are not reported as skipped"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
@pytest.mark.parametrize("name,needs", [("te", "transformer_engine"), ("te_full", "transformer_engine"), ("modelopt", "modelopt")])
def test_requesting_a_gpu_spec_here_raises(pm, name: str, needs: str) -> None:
    with pytest.raises(LayerSpecError, match=f"'{name}'.*{needs}"):
        select_layer_spec(pm, "gpt", name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
def test_build_model_refuses_te_before_building(tiny_config, plugtron_single_rank) -> None:
    from plugtron.pipeline import build_model

    with pytest.raises(LayerSpecError, match="transformer_engine"):
        build_model(tiny_config(layer_spec="te"))


def test_unknown_spec_lists_the_offered_ones(pm) -> None:
    with pytest.raises(LayerSpecError, match="no layer spec 'flash'.*te, te_full, torch, local, modelopt"):
        select_layer_spec(pm, "gpt", "flash")


def test_auto_picks_te_with_transformer_engine_and_cuda(pm, machine) -> None:
    machine({"transformer_engine"}, cuda=True)
    choice = select_layer_spec(pm, "gpt", "auto")
    assert choice.info.name == "te"
    assert "transformer_engine and CUDA present" in choice.reason
    assert select_layer_spec(pm, "gpt", "te_full").info.name == "te_full"


def test_transformer_engine_without_cuda_is_skipped_with_the_reason(pm, machine) -> None:
    machine({"transformer_engine", "modelopt"}, cuda=False)
    choice = select_layer_spec(pm, "gpt", "auto")
    assert choice.info.name == "torch"
    assert "transformer_engine is installed but CUDA is not available" in choice.reason
    with pytest.raises(LayerSpecError, match="CUDA is not available"):
        select_layer_spec(pm, "gpt", "modelopt")


def test_modelopt_alone_does_not_beat_torch(pm, machine) -> None:
    machine({"modelopt"}, cuda=True)
    assert select_layer_spec(pm, "gpt", "auto").info.name == "torch"
    assert select_layer_spec(pm, "gpt", "modelopt").info.name == "modelopt"


def test_only_te_specs_use_transformer_engine_for_mtp() -> None:
    assert [n for n in ("te", "te_full", "torch", "local", "modelopt") if specs.uses_transformer_engine(n)] == ["te", "te_full"]


@pytest.mark.parametrize("spec,attention", [("torch", "SDPACoreAttention"), ("local", "DotProductAttention")])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_cpu_specs_build_their_modules(tiny_config, build, spec: str, attention: str, qk_norm: bool) -> None:
    built = build(tiny_config(layer_spec=spec, qk_layernorm=qk_norm))
    assert built.report.layer_spec == spec and built.report.spec_reason.startswith("requested")
    layer = built.chunks[0].decoder.layers[0]
    assert type(layer.self_attention.core_attention).__name__ == attention
    q_norm = type(layer.self_attention.q_layernorm).__name__
    assert q_norm == ("RMSNorm" if qk_norm else "IdentityOp")
    assert type(layer.input_layernorm).__name__ == "RMSNorm"


@pytest.mark.parametrize("overrides", [{}, {"qk_layernorm": True, "num_query_groups": 1}, {"position_embedding_type": "learned_absolute"}])
def test_torch_and_local_specs_agree(tiny_config, build, overrides: dict) -> None:
    """Same seed, same weights: SDPA attention must match megatron's DotProductAttention."""
    logits = {}
    for spec in ("torch", "local"):
        built = build(tiny_config(layer_spec=spec, **overrides))
        model, builder = built.chunks[0], built.context.builder
        batch = builder.random_batch(2, 12)
        batch.pop("labels")
        with torch.no_grad():
            logits[spec] = builder.forward_step(model.eval(), batch)
    torch.testing.assert_close(logits["torch"], logits["local"], rtol=1e-5, atol=1e-5)
