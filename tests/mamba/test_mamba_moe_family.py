"""The mamba family's MoE (``E``) layers: config rules (field named), build, meta init, a training step."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from plugtron.errors import ConfigError

MOE: dict[str, Any] = dict(hybrid_override_pattern="M*E-", num_moe_experts=4, moe_router_topk=2,
                           moe_ffn_hidden_size=48, moe_shared_expert_intermediate_size=32,
                           moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                           moe_router_topk_scaling_factor=2.5, activation_func=torch.nn.functional.relu)


def _error(config: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        config.finalize()
    return info.value


@pytest.mark.parametrize("overrides,field,words", [
    ({"num_moe_experts": None}, "num_moe_experts", "'E'"),
    ({"hybrid_override_pattern": "M*M-"}, "num_moe_experts", "no MoE"),
    ({"num_moe_experts": None, "hybrid_override_pattern": "M*M-"}, "moe_ffn_hidden_size", "num_moe_experts is not set"),
    ({"moe_grouped_gemm": True}, "moe_grouped_gemm", "SequentialMLP"),
    ({"moe_latent_size": 16}, "moe_latent_size", "TELinear"),
    ({"moe_layer_freq": 2}, "moe_layer_freq", "pattern"),
    ({"expert_model_parallel_size": 3}, "expert_model_parallel_size", "divisible"),
    ({"moe_router_topk": 5}, "moe_router_topk", "between 1 and num_moe_experts=4"),
    ({"moe_router_score_function": "softmax"}, "moe_router_enable_expert_bias", "sigmoid"),
    ({"moe_router_num_groups": 2}, "moe_router_group_topk", "both"),
    ({"moe_token_dispatcher_type": "flex"}, "moe_token_dispatcher_type", "allgather, alltoall"),
    ({"tensor_model_parallel_size": 2, "sequence_parallel": False}, "sequence_parallel", "leave it unset"),
])
def test_moe_rules_name_the_field(tiny_config, overrides, field, words) -> None:
    error = _error(tiny_config(**{**MOE, **overrides}))
    assert error.field == field and words in str(error), str(error)


def test_sequence_parallel_is_switched_on_for_moe_at_tp2_only_when_unset(tiny_config) -> None:
    config = tiny_config(**MOE, tensor_model_parallel_size=2, expert_model_parallel_size=2)
    assert config.auto_sequence_parallel() and config.megatron_kwargs()["sequence_parallel"] is True
    assert "sequence_parallel" not in config.transformer_kwargs
    assert not tiny_config(**MOE).auto_sequence_parallel()


def _moe_layer(built: Any) -> Any:
    from megatron.core.transformer.transformer_layer import MoETransformerLayer

    (layer,) = [l for l in built.chunks[0].decoder.layers if isinstance(l, MoETransformerLayer)]
    return layer


def test_build_names_and_meta_init(tiny_config, build) -> None:
    built = build(tiny_config(**MOE).finalize(), meta=True)
    names = {n for n, _ in built.chunks[0].named_parameters() if n.startswith("decoder.layers.2.")}
    assert names == {"decoder.layers.2.pre_mlp_layernorm.weight", "decoder.layers.2.mlp.router.weight",
                     "decoder.layers.2.mlp.shared_experts.linear_fc1.weight",
                     "decoder.layers.2.mlp.shared_experts.linear_fc2.weight",
                     *(f"decoder.layers.2.mlp.experts.local_experts.{e}.linear_fc{k}.weight" for e in range(4) for k in (1, 2))}
    layer = _moe_layer(built)
    # megatron's float32 buffer, saved with the model, zero after a meta build as after an eager one
    assert "mlp.router.expert_bias" in layer.state_dict()
    assert layer.mlp.router.expert_bias.dtype == torch.float32
    assert torch.equal(layer.mlp.router.expert_bias, torch.zeros(4))
    assert torch.equal(layer.pre_mlp_layernorm.weight, torch.ones(64))
    assert layer.mlp.experts.local_experts[0].linear_fc1.weight.shape == (48, 64)  # not gated: up only
    assert layer.mlp.router.weight.abs().sum() > 0


def test_training_step_reaches_router_and_experts_not_the_bias(tiny_config, build) -> None:
    built = build(tiny_config(**MOE).finalize())
    model, builder = built.chunks[0], built.context.builder
    model.train()
    tokens = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"tokens": tokens, "position_ids": torch.arange(16).expand(2, -1), "labels": tokens}
    out = builder.forward_step(model, batch)
    out.float().mean().backward()
    layer = _moe_layer(built)
    assert layer.mlp.router.weight.grad is not None and layer.mlp.router.weight.grad.abs().sum() > 0
    assert layer.mlp.shared_experts.linear_fc1.weight.grad is not None
    assert layer.mlp.router.expert_bias.grad is None
    assert layer.mlp.router.local_tokens_per_expert.sum() == 2 * 16 * 2  # megatron counts routed tokens for the bias update
