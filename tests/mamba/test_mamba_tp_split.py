"""Tensor-parallel split of TorchMambaMixer (TP=2, two gloo processes on CPU).

Reference: transformers' Mamba2Mixer holding the full weights.  Each TP rank
receives megatron's local shard: for in_proj its own heads'/groups' rows of every
block, in the local order [z_r | x_r | B_r | C_r | dt_r]; conv channels
[x_r | B_r | C_r]; per-head dt_bias/A_log/D; its slice of the norm weight; and
its column block of out_proj.  RowParallelLinear all-reduces, so every rank must
reproduce the full single-device output.
"""

from __future__ import annotations

import pathlib
import socket
import sys
import time
import warnings
from typing import Dict

import pytest
import torch

D_MODEL, D_STATE, HEADDIM, NGROUPS, NHEADS, D_CONV = 64, 16, 16, 2, 8, 4
D_INNER = NHEADS * HEADDIM
TP = 2
TIMEOUT_S = 180


def shard_for_rank(full: Dict[str, torch.Tensor], rank: int, tp: int) -> Dict[str, torch.Tensor]:
    """Cut a full (TP=1) mixer state dict into TP rank ``rank``'s local tensors."""

    def part(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return t.chunk(tp, dim=dim)[rank]

    gn = NGROUPS * D_STATE
    z, x, B, C, dt = full["in_proj.weight"].split([D_INNER, D_INNER, gn, gn, NHEADS])
    conv_sizes = [D_INNER, gn, gn]
    return {
        "in_proj.weight": torch.cat([part(z), part(x), part(B), part(C), part(dt)]),
        "conv1d.weight": torch.cat([part(t) for t in full["conv1d.weight"].split(conv_sizes)]),
        "conv1d.bias": torch.cat([part(t) for t in full["conv1d.bias"].split(conv_sizes)]),
        "dt_bias": part(full["dt_bias"]),
        "A_log": part(full["A_log"]),
        "D": part(full["D"]),
        "norm.weight": part(full["norm.weight"]),
        "out_proj.weight": part(full["out_proj.weight"], dim=1),
    }


def _worker(rank: int, port: int, path: str) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    # Prove the TP path works without the GPU kernel packages even where they exist
    # (a None entry makes `import name` raise ImportError).
    for name in ("triton", "mamba_ssm", "causal_conv1d", "einops"):
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]
    torch.distributed.init_process_group(
        "gloo", rank=rank, world_size=TP, init_method=f"tcp://127.0.0.1:{port}"
    )
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig

    from plugtron_mamba.torch_impl import TorchMambaMixer, TorchMambaMixerSubmodules

    parallel_state.initialize_model_parallel(TP, 1)
    try:
        data = torch.load(path)
        config = TransformerConfig(
            num_layers=1,
            hidden_size=D_MODEL,
            num_attention_heads=4,
            use_cpu_initialization=True,
            tensor_model_parallel_size=TP,
            mamba_state_dim=D_STATE,
            mamba_head_dim=HEADDIM,
            mamba_num_groups=NGROUPS,
        )
        mixer = TorchMambaMixer(
            config,
            TorchMambaMixerSubmodules(in_proj=ColumnParallelLinear, out_proj=RowParallelLinear),
            d_model=D_MODEL,
            chunk_size=8,
        )
        local = shard_for_rank(data["state"], rank, TP)
        shapes = {k: tuple(v.shape) for k, v in mixer.named_parameters()}
        assert shapes == {k: tuple(v.shape) for k, v in local.items()}, shapes
        mixer.load_state_dict(local, strict=False)
        with torch.no_grad():
            out, _ = mixer(data["x"].transpose(0, 1).contiguous())
        diff = (out.transpose(0, 1) - data["expected"]).abs().max().item()
        torch.save({"diff": diff, "norm_group": mixer.norm.group_size}, f"{path}.rank{rank}")
    finally:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


@pytest.mark.multiprocess
def test_tp2_shards_reproduce_full_mixer(tmp_path: pathlib.Path) -> None:
    # Imported here, not at module level: the spawned workers import this module.
    transformers = pytest.importorskip("transformers")
    hf_mamba2 = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    config = transformers.Mamba2Config(
        hidden_size=D_MODEL, state_size=D_STATE, head_dim=HEADDIM, n_groups=NGROUPS,
        expand=2, conv_kernel=D_CONV, chunk_size=8, num_heads=NHEADS,
        num_hidden_layers=1, layer_norm_epsilon=1e-5,
    )
    torch.manual_seed(0)
    hf = hf_mamba2.Mamba2Mixer(config, layer_idx=0).eval()
    with torch.no_grad():
        hf.norm.weight.normal_(1.0, 0.3)
        hf.D.normal_()
    x = torch.randn(2, 13, D_MODEL)
    with torch.no_grad():
        expected = hf(x)
    path = str(tmp_path / "mixer.pt")
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    torch.save({"state": state, "x": x, "expected": expected}, path)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # spawn, not fork: forking a process that already ran OpenMP-threaded torch ops
    # can deadlock the children.
    context = torch.multiprocessing.spawn(_worker, args=(port, path), nprocs=TP, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"TP workers did not finish within {TIMEOUT_S} s")
    for rank in range(TP):
        result = torch.load(f"{path}.rank{rank}")
        assert result["norm_group"] == D_INNER // NGROUPS  # groups stay whole per rank
        assert result["diff"] <= 1e-4, (rank, result["diff"])
