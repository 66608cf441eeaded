"""A third party replaces the GPT family's MoE router or experts from its own plugin (``plugtron_moe_submodules``).

The plugins here are registered in-process (``plugtron.testing`` fixtures),
as a plugin author's own tests would do it.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.router import TopKRouter

from plugtron import BuildOptions, LayerSpecError, PluginError, hookimpl
from plugtron.pipeline import build_model
from plugtron.testing import plugin_namespace

MOE = dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32, moe_token_dispatcher_type="alltoall")


class PinnedRouter(TopKRouter):
    """Records every call and sends every token to experts 0 and 1 with weight 1/2."""

    calls: list[tuple[int, ...]] = []

    def routing(self, logits: torch.Tensor, padding_mask: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        type(self).calls.append(tuple(logits.shape))
        tokens = logits.reshape(-1, self.config.num_moe_experts).shape[0]
        routing_map = torch.zeros(tokens, self.config.num_moe_experts, dtype=torch.bool)
        routing_map[:, : self.topk] = True
        # keep the router's logits in the graph, with a zero contribution, so its weight gets a (zero) gradient
        probs = routing_map.to(logits.dtype) / self.topk + 0.0 * logits.reshape(tokens, -1)
        return probs, routing_map


class CountingExperts(SequentialMLP):
    """megatron's SequentialMLP that counts the tokens it receives (a bare class: keeps the default linears)."""

    tokens = 0

    def forward(self, hidden: torch.Tensor, tokens_per_expert: torch.Tensor, probs: torch.Tensor) -> Any:
        type(self).tokens += int(hidden.shape[0])
        return super().forward(hidden, tokens_per_expert, probs)


def _plugin(**parts: Any) -> Any:
    @hookimpl
    def plugtron_moe_submodules(config: Any, family: Any) -> dict[str, Any] | None:
        return dict(parts) if family.name == "gpt" else None

    return plugin_namespace(plugtron_moe_submodules)


@pytest.fixture
def gpt_pm(plugtron_manager_factory: Any) -> Any:
    """A manager with only the GPT family plugin (no other installed plugin can take part)."""
    return plugtron_manager_factory(load_entrypoints=False, plugins=[("gpt", "plugtron_gpt.plugin")])


def _build(config: Any, pm: Any, parallel: Any) -> Any:
    from plugtron.runtime.cpu import seed_everything

    seed_everything(1234)
    return build_model(config, parallel=parallel, pm=pm, options=BuildOptions(print_report=False))


def test_a_plugin_router_routes_every_moe_layer_and_the_mtp_layer(gpt_pm, tiny_config, plugtron_single_rank) -> None:
    gpt_pm.register(_plugin(router=PinnedRouter), name="pinned-routing")
    assert "plugtron_moe_submodules" in gpt_pm.records["pinned-routing"].hooks, "plugtron plugins lists the hook"
    built = _build(tiny_config(**MOE, mtp_num_layers=1), gpt_pm, plugtron_single_rank)
    model, builder = built.chunks[0], built.context.builder
    routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
    assert len(routers) == 3 and all(type(r) is PinnedRouter for r in routers), "two decoder layers and the MTP layer"
    PinnedRouter.calls.clear()
    model.train()
    builder.forward_step(model, builder.random_batch(2, 16)).mean().backward()
    assert PinnedRouter.calls == [(16, 2, 4)] * 3
    for layer in list(model.decoder.layers) + [model.mtp.layers[0].transformer_layer]:
        experts = layer.mlp.experts.local_experts
        for index, expert in enumerate(experts):
            grad = expert.linear_fc1.weight.grad
            if index < 2:
                assert grad is not None and grad.abs().sum() > 0, f"expert {index} got the pinned tokens"
            else:
                assert grad is None or grad.abs().sum() == 0, f"expert {index} got tokens the router never sent"


def test_experts_replaced_by_a_bare_class_keep_the_default_linears(gpt_pm, tiny_config, plugtron_single_rank) -> None:
    """A class (here by import path, as a torch-free plugin module names it) gets the default spec's submodules."""
    gpt_pm.register(_plugin(experts=f"{__name__}:CountingExperts"), name="counting-experts")
    built = _build(tiny_config(**MOE), gpt_pm, plugtron_single_rank)
    model, builder = built.chunks[0], built.context.builder
    experts = [layer.mlp.experts for layer in model.decoder.layers]
    assert all(type(e) is CountingExperts and len(e.local_experts) == 4 for e in experts)
    assert type(model.decoder.layers[0].mlp.router) is TopKRouter, "parts not replaced keep megatron's"
    CountingExperts.tokens = 0
    builder.forward_step(model, builder.random_batch(2, 16))
    assert CountingExperts.tokens == 2 * (2 * 16 * 2), "two layers, 32 tokens, top-2"


def test_two_plugins_may_replace_different_parts_but_not_the_same(gpt_pm, tiny_config) -> None:
    gpt_pm.register(_plugin(router=PinnedRouter), name="routing-a")
    gpt_pm.register(_plugin(experts=CountingExperts), name="experts-b")
    config = tiny_config(**MOE).finalize()
    family = gpt_pm.family("gpt")
    assert {k: r.plugin for k, r in gpt_pm.hooks.moe_submodules(config, family).items()} == {
        "router": "routing-a", "experts": "experts-b"}
    gpt_pm.register(_plugin(router=TopKRouter), name="routing-c")
    with pytest.raises(PluginError, match="'routing-a' and 'routing-c' both replace the MoE 'router'"):
        gpt_pm.hooks.moe_submodules(config, family)


@pytest.mark.parametrize("parts,message", [
    (dict(routr=PinnedRouter), "unknown MoE part 'routr'; megatron's MoE layer has experts, shared_experts, router"),
    (dict(shared_experts=SequentialMLP), "replaces the shared experts, but the config has none"),
    (dict(router="no_such_module:Router"), "'no_such_module:Router' does not import"),
    (dict(router=3), "must be a class, a ModuleSpec or an import path"),
])
def test_a_wrong_replacement_names_the_plugin(gpt_pm, tiny_config, parts: dict, message: str) -> None:
    gpt_pm.register(_plugin(**parts), name="bad-moe")
    builder = gpt_pm.hooks.create_builder(tiny_config(**MOE, layer_spec="torch").finalize(), gpt_pm.family("gpt"))
    builder.select_spec(gpt_pm)
    with pytest.raises(LayerSpecError, match=f"plugin 'bad-moe'.*{message}"):
        builder.layer_spec()


def test_dense_models_never_ask(gpt_pm, tiny_config) -> None:
    asked = []

    @hookimpl
    def plugtron_moe_submodules(config: Any, family: Any) -> None:
        asked.append(family.name)

    gpt_pm.register(plugin_namespace(plugtron_moe_submodules), name="watcher")
    builder = gpt_pm.hooks.create_builder(tiny_config(layer_spec="torch").finalize(), gpt_pm.family("gpt"))
    builder.select_spec(gpt_pm)
    builder.layer_spec()
    assert asked == []
