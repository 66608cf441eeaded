"""The CPU runtime's answers for Mixture-of-Experts and Multi-Latent Attention (plugtron.runtime.cpu).

Each shim is checked on its own here; the builds, steps and layout-parity runs
check them together. All of them are installed only without CUDA.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from plugtron.runtime import cpu


@pytest.fixture
def runtime(plugtron_single_rank):
    assert cpu.is_enabled()
    return cpu


def test_router_gemm_name_exists(runtime) -> None:
    from megatron.core.transformer.moe import moe_utils

    assert moe_utils.te_general_gemm is None  # the allgather dispatcher's NameError


def test_streams_and_events_are_in_order_no_ops(runtime) -> None:
    stream = torch.cuda.Stream()
    assert isinstance(stream, cpu.CpuStream) and torch.cuda.current_stream() is torch.cuda.current_stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        event = torch.cuda.Event()
        event.record()
    assert event.query() and stream.query()


def test_split_sizes_become_numpy(runtime) -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    for module in (moe_utils, token_dispatcher):
        sizes = module.maybe_move_tensor_to_cpu(torch.tensor([3, 1]), as_numpy=True)
        assert isinstance(sizes, np.ndarray) and sizes.tolist() == [3, 1]
    assert torch.is_tensor(token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([3, 1])))


def test_uneven_gather_pads_gathers_and_trims(runtime, monkeypatch) -> None:
    """gloo cannot all_gather tensors of different sizes; the shim pads to the largest split and trims."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    mine, peer = torch.arange(6.0).reshape(3, 2), -torch.arange(2.0).reshape(1, 2)

    class TwoRanks:
        def size(self) -> int:
            return 2

    def gather(output, padded, group=None):  # what rank 1 would contribute, padded to 3 rows
        output[:3] = padded
        output[3:] = torch.cat([peer, torch.full((2, 2), 99.0)])

    monkeypatch.setattr(dist, "all_gather_single", gather, raising=False)
    out = mappings._gather_along_first_dim(mine, TwoRanks(), output_split_sizes=[3, 1])
    assert torch.equal(out, torch.cat([mine, peer]))


def test_torch_norm_supports_sequence_parallelism(tiny_config) -> None:
    config = tiny_config(num_moe_experts=4, tensor_model_parallel_size=2).finalize().transformer
    assert config.sequence_parallel
    norm = cpu.TorchNorm(config=config, hidden_size=8, eps=1e-6)
    assert type(norm) is torch.nn.RMSNorm and all(p.sequence_parallel for p in norm.parameters())
    config.normalization = "LayerNorm"
    norm = cpu.TorchNorm(config=config, hidden_size=8)
    assert type(norm) is torch.nn.LayerNorm and [p.sequence_parallel for p in norm.parameters()] == [True, True]
    config.layernorm_zero_centered_gamma = True  # (1 + w): Nemotron's LayerNorm1P, weights start at 0
    norm = cpu.TorchNorm(config=config, hidden_size=8)
    assert type(norm) is cpu.ZeroCenteredLayerNorm and torch.count_nonzero(norm.weight) == 0
    assert all(p.sequence_parallel for p in norm.parameters())


def test_mla_knows_transformer_engine_is_absent(runtime) -> None:
    from megatron.core.transformer import multi_latent_attention

    assert not cpu.transformer_engine_importable()
    assert multi_latent_attention.HAVE_TE is False


def test_expert_bias_counter_runs_eagerly(runtime) -> None:
    from megatron.core.transformer.moe.router import TopKRouter

    assert not hasattr(TopKRouter._apply_expert_bias, "_torchdynamo_orig_callable")


def test_shims_are_installed_only_without_cuda(runtime, monkeypatch) -> None:
    from megatron.core.tensor_parallel import mappings
    from megatron.core.transformer.moe import moe_utils, router, token_dispatcher

    shimmed = (torch.cuda.Stream, mappings._gather_along_first_dim, token_dispatcher.maybe_move_tensor_to_cpu)
    cpu.disable()
    try:
        assert torch.cuda.Stream is not cpu.CpuStream and not hasattr(moe_utils, "te_general_gemm")
        assert mappings._gather_along_first_dim is not shimmed[1]
        assert token_dispatcher.maybe_move_tensor_to_cpu is moe_utils.maybe_move_tensor_to_cpu is not shimmed[2]
        assert hasattr(router.TopKRouter._apply_expert_bias, "_torchdynamo_orig_callable")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert cpu.enable_if_needed() is False and torch.cuda.Stream is not cpu.CpuStream
    finally:
        monkeypatch.undo()
        cpu.enable()
    assert torch.cuda.Stream is cpu.CpuStream and moe_utils.te_general_gemm is None
