"""MoE and MLA GPT models on one CPU rank: what the specs build, one training step, the step's losses.

The three example configs (``examples/configs/gpt/{mixtral,qwen3_moe,deepseek_v3}_like.yaml``)
are also covered by the tests parametrised over every example (round trip,
meta build equals eager, build and train with the torch and local specs, the CLI).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from plugtron import ConfigError, LayerSpecError, PipelineError
from plugtron.config import load

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "configs" / "gpt"


def example(name: str):
    return load(EXAMPLES / f"{name}.yaml")


def layers(built):
    return built.chunks[0].decoder.layers


@pytest.mark.parametrize("name,dispatcher", [("mixtral_like", "MoEAlltoAllTokenDispatcher"), ("qwen3_moe_like", "MoEAllGatherTokenDispatcher")])
def test_moe_layers_of_the_torch_spec(build, train_step, name: str, dispatcher: str) -> None:
    config = example(name)
    built = build(config)
    for layer in layers(built):
        moe = layer.mlp
        assert type(moe).__name__ == "MoELayer" and type(moe.experts).__name__ == "SequentialMLP"
        assert len(moe.experts.local_experts) == config.num_moe_experts
        assert type(moe.token_dispatcher).__name__ == dispatcher
        assert type(layer.self_attention.core_attention).__name__ == "SDPACoreAttention"
        assert type(layer.pre_mlp_layernorm).__name__ == "RMSNorm"
    if config.qk_layernorm:
        assert type(layers(built)[0].self_attention.q_layernorm).__name__ == "RMSNorm"
    train_step(built)


def test_deepseek_v3_like_layers(build) -> None:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    config = example("deepseek_v3_like")
    built = build(config)
    model = built.chunks[0]
    dense, moe = layers(built)
    assert type(dense.mlp).__name__ == "MLP", "moe_layer_freq [0, 1]: the first layer is dense"
    assert type(moe.mlp).__name__ == "MoELayer" and type(moe.mlp.shared_experts).__name__ == "SharedExpertMLP"
    assert moe.mlp.router.expert_bias is not None and not moe.mlp.router.expert_bias.is_meta
    for layer in (dense, moe):
        attention = layer.self_attention
        assert type(attention).__name__ == "MLASelfAttention"
        assert type(attention.core_attention).__name__ == "SDPACoreAttention"
        for proj in (attention.linear_q_down_proj, attention.linear_kv_down_proj):
            assert not isinstance(proj, ColumnParallelLinear), "replicated, never column-parallel (wrong grads at TP>1)"
            assert not getattr(proj.weight, "tensor_model_parallel", False)
            # re-drawn with init_method (normal, std 0.02), not torch's Kaiming-uniform default
            assert abs(proj.weight.std().item() - config.init_method_std) < 0.3 * config.init_method_std
        assert type(attention.rotary_pos_emb).__name__ == "YarnRotaryEmbedding"
    assert model.rotary_pos_emb is dense.self_attention.rotary_pos_emb, "alias of the first layer's"
    assert "rotary_pos_emb" not in dict(model.named_children()), "an alias, not a second submodule"
    mtp_layer = model.mtp.layers[0]
    assert type(mtp_layer.transformer_layer.self_attention).__name__ == "MLASelfAttention"
    assert type(mtp_layer.transformer_layer.mlp).__name__ == "MoELayer"
    assert isinstance(mtp_layer.eh_proj, ColumnParallelLinear)


def test_step_returns_aux_and_mtp_losses_and_updates_the_expert_bias(build) -> None:
    from plugtron.training import random_batches, train_step

    config = example("deepseek_v3_like")
    built = build(config)
    router = layers(built)[1].mlp.router
    assert torch.equal(router.expert_bias, torch.zeros_like(router.expert_bias))
    step = train_step(built, random_batches(built, 2, 2, 16))
    assert set(step.aux_losses) == {"seq_load_balancing_loss"}
    # balanced routing gives 1; a fresh router is close to it
    assert 0.5 < step.aux_losses["seq_load_balancing_loss"] < 3.0
    assert step.mtp_loss is not None and abs(step.mtp_loss - math.log(config.vocab_size)) < 1.5
    assert step.loss is not None and abs(step.loss - math.log(config.vocab_size)) < 1.5
    rate = config.moe_router_bias_update_rate
    steps = router.expert_bias / rate  # float32 bias: sign(mean - count) x rate
    assert torch.allclose(steps, steps.round()) and set(steps.round().tolist()) <= {-1.0, 0.0, 1.0}
    assert router.expert_bias.abs().sum() > 0
    assert torch.equal(router.local_tokens_per_expert, torch.zeros_like(router.local_tokens_per_expert))
    again = train_step(built, random_batches(built, 2, 2, 16))
    assert set(again.aux_losses) == {"seq_load_balancing_loss"}, "the tracker holds this step's kinds only"


def test_z_loss_and_aux_loss_are_both_reported(tiny_config, build) -> None:
    from plugtron.training import random_batches, train_step

    built = build(tiny_config(num_moe_experts=4, moe_ffn_hidden_size=32, moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001))
    step = train_step(built, random_batches(built, 2, 2, 8))
    assert set(step.aux_losses) == {"load_balancing_loss", "z_loss"} and step.mtp_loss is None
    assert all(math.isfinite(v) and v > 0 for v in step.aux_losses.values())


def test_torch_and_local_specs_agree_on_moe_and_mla(build) -> None:
    """Same seed, same weights: megatron's local spec (with SDPA for MLA) and the torch spec."""
    logits = {}
    for spec in ("torch", "local"):
        config = example("deepseek_v3_like")
        config.layer_spec = spec
        built = build(config)
        model, builder = built.chunks[0], built.context.builder
        batch = builder.random_batch(2, 12)
        batch.pop("labels")
        with torch.no_grad():
            logits[spec] = builder.forward_step(model.eval(), batch)
    torch.testing.assert_close(logits["torch"], logits["local"], rtol=1e-5, atol=1e-5)


def test_aux_loss_scale_is_reset_before_a_forward(tiny_config, build) -> None:
    """A schedule leaves 1/micro-batches in megatron's process-wide aux-loss scale; a plain forward must not inherit it."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    built = build(tiny_config(num_moe_experts=4, moe_ffn_hidden_size=32, moe_aux_loss_coeff=0.01))
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(0.125))
    builder = built.context.builder
    builder.forward_step(built.chunks[0], builder.random_batch(1, 8))
    assert float(MoEAuxLossAutoScaler.main_loss_backward_scale) == 1.0


def test_te_full_refuses_moe(tiny_config) -> None:
    from plugtron_gpt import specs

    with pytest.raises(LayerSpecError, match="te_full.*neither MoE nor MLA"):
        specs.te_full_spec(tiny_config(num_moe_experts=4).finalize())


def test_layout_must_match_the_expert_layout(tiny_config, plugtron_single_rank) -> None:
    from plugtron.pipeline import build_model
    from plugtron.runtime.parallel import initialize_parallel

    with pytest.raises(PipelineError, match="world size 1 is not divisible by expert_tensor_parallel=1 x expert_model_parallel=2"):
        initialize_parallel(ep=2)
    with pytest.raises(PipelineError, match=r"expert parallelism \(ep, etp\) = \(2, 1\).*pass ep= and etp="):
        build_model(tiny_config(num_moe_experts=4, expert_model_parallel_size=2), parallel=plugtron_single_rank)


@pytest.mark.parametrize("argv,world", [
    (["--ep", "2"], 2), (["--tp", "2", "--ep", "2"], 4), (["--tp", "2", "--etp", "1", "--ep", "2"], 2),
    (["--tp", "2", "--etp", "1"], 2), (["--pp", "2", "--ep", "2"], 4), (["--ep", "2", "--dp", "4"], 4),
])
def test_cli_sizes_the_world_as_megatron_does(argv: list, world: int) -> None:
    """dense ranks tp x dp x pp; experts reuse them as etp x ep x edp x pp (etp defaults to tp)."""
    assert _world(argv) == world


def test_cli_refuses_a_data_parallel_size_experts_cannot_use() -> None:
    with pytest.raises(ConfigError, match="--dp 3 gives 3 ranks"):
        _world(["--ep", "2", "--dp", "3"])


def _world(argv: list) -> int:
    """Ranks ``plugtron build mixtral_like.yaml ARGV`` would start (nothing is launched)."""
    import argparse

    from plugtron.cli import build_cmd

    parser = argparse.ArgumentParser()
    build_cmd.add_parser(parser.add_subparsers())
    args = parser.parse_args(["build", str(EXAMPLES / "mixtral_like.yaml"), *argv])
    config = example("mixtral_like")
    build_cmd._apply_layout(config, args)
    return build_cmd._world_size(config.finalize(), args)


OPTIONS = {
    "capacity drop": dict(moe_expert_capacity_factor=1.0, moe_token_dispatcher_type="alltoall"),
    "capacity drop and pad": dict(moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=True, moe_token_dispatcher_type="alltoall"),
    "drop by position": dict(moe_expert_capacity_factor=0.5, moe_token_drop_policy="position"),
    "sinkhorn top-1": dict(moe_router_load_balancing_type="sinkhorn", moe_router_topk=1, moe_aux_loss_coeff=0.0),
    "global aux loss": dict(moe_router_load_balancing_type="global_aux_loss", moe_aux_loss_coeff=0.01),
    "aux + seq aux": dict(moe_router_load_balancing_type=["aux_loss", "seq_aux_loss"], moe_aux_loss_coeff=[0.01, 0.001]),
    "fp64 router, z-loss, jitter": dict(moe_router_dtype="fp64", moe_z_loss_coeff=0.001, moe_input_jitter_eps=0.01),
    "shared expert overlap (streams)": dict(moe_shared_expert_intermediate_size=32, moe_shared_expert_overlap=True, moe_token_dispatcher_type="alltoall"),
    "shared expert gate": dict(moe_shared_expert_intermediate_size=32, moe_shared_expert_gate=True),
    "every other layer": dict(num_layers=4, moe_layer_freq=2),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_router_and_dispatch_options_step(tiny_config, build, name: str) -> None:
    """Forward and backward through megatron's schedule for each option on the CPU runtime."""
    from plugtron.training import random_batches, train_step

    built = build(tiny_config(**{"num_moe_experts": 4, "moe_ffn_hidden_size": 32, "moe_aux_loss_coeff": 0.01, **OPTIONS[name]}))
    step = train_step(built, random_batches(built, 2, 2, 16))
    assert step.loss is not None and math.isfinite(step.loss)
    grads = [p.grad for p in built.chunks[0].parameters()]
    assert all(g is not None and g.isfinite().all() for g in grads)
    assert all(math.isfinite(v) for v in step.aux_losses.values())
    pattern = [type(layer.mlp).__name__ for layer in layers(built)]
    assert pattern == (["MoELayer", "MLP"] * 2 if name == "every other layer" else ["MoELayer"] * 2)


def test_fsdp2_shards_experts_over_the_expert_data_parallel_group(tiny_config, build) -> None:
    """Routed experts are FSDP2 units of their own, on the expert-DP group's mesh, and keep megatron's attributes.

    The numbers (EP=2, dp=2, TP=2 with ETP=1/2 against one process) are in
    tests/distributed/test_moe_layouts.py.
    """
    from megatron.core import parallel_state
    from torch.distributed.fsdp import FSDPModule

    from plugtron.builder import BuildContext, BuildOptions
    from plugtron.pipeline import wrap
    from plugtron.training import forward_backward, random_batches

    built = build(tiny_config(num_moe_experts=4, moe_ffn_hidden_size=32))
    context = BuildContext(parallel=built.context.parallel, options=BuildOptions(wrap="fsdp2"), builder=built.context.builder)
    chunk = wrap.wrap_data_parallel(built.chunks, built.context.builder.config, context)[0]
    for layer in layers(built):
        assert isinstance(layer, FSDPModule) and isinstance(layer.mlp.experts, FSDPModule)
        weight = layer.mlp.experts.local_experts[0].linear_fc1.weight
        assert weight.device_mesh.get_group() is parallel_state.get_expert_data_parallel_group()
        assert layer.self_attention.linear_qkv.weight.device_mesh.get_group() is parallel_state.get_data_parallel_group()
        assert weight.tensor_model_parallel and weight.partition_dim == 0, "megatron's attributes survive fully_shard"
    built.chunks[:] = [chunk]
    assert forward_backward(built, random_batches(built, 1, 2, 16)) is not None
    assert all(p.grad is not None for p in chunk.parameters())


def test_ddp_marks_experts_for_the_expert_data_parallel_group(tiny_config, build) -> None:
    """megatron leaves allreduce=True on experts at EP=1; plugtron hands them to DDP's expert buffers."""
    from plugtron.pipeline import wrap

    chunk = build(tiny_config(num_moe_experts=4, moe_ffn_hidden_size=32)).chunks[0]
    experts = wrap.expert_parameters(chunk)
    assert len(experts) == 2 * 4 * 2 and all(getattr(p, "allreduce", True) for p in experts)
    wrap.reduce_experts_over_expert_data_parallel([chunk])
    assert not any(p.allreduce for p in experts)
    others = [p for p in chunk.parameters() if all(p is not e for e in experts)]
    assert others and all(getattr(p, "allreduce", True) for p in others), "only routed experts change group"


@pytest.mark.parametrize("local,ep_rank,expected", [
    ("decoder.layers.1.mlp.experts.local_experts.1.linear_fc1.weight", 2, "decoder.layers.1.mlp.experts.local_experts.9.linear_fc1.weight"),
    ("decoder.layers.1.mlp.experts.linear_fc2.weight3", 1, "decoder.layers.1.mlp.experts.linear_fc2.weight7"),  # grouped MLPs
    ("decoder.layers.1.mlp.shared_experts.linear_fc1.weight", 1, "decoder.layers.1.mlp.shared_experts.linear_fc1.weight"),
])
def test_expert_global_names(local: str, ep_rank: int, expected: str) -> None:
    from plugtron.sharding import expert_global_name, is_expert_name, to_global_name

    assert expert_global_name(local, ep_rank, 4) == expected
    assert is_expert_name(local) == ("shared" not in local)
    assert to_global_name("mtp.layers.0.transformer_layer.mlp.router.weight", 3) == "mtp.layers.0.transformer_layer.mlp.router.weight"
