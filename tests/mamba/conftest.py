"""Fixtures for the pure-PyTorch Mamba tests.

megatron's parallel layers need ``torch.distributed`` and megatron's model-parallel
state even on one CPU process, so a module-scoped fixture brings up a one-rank
gloo group with TP = PP = 1 and tears both down afterwards.
"""

from __future__ import annotations

import socket
import warnings
from typing import Any, Callable, Iterator

import pytest
import torch


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def megatron_single_rank() -> Iterator[None]:
    """Initialise a 1-process gloo group and megatron parallel state (TP=PP=1)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state

    if torch.distributed.is_initialized():
        pytest.skip("torch.distributed already initialised by another test module")
    torch.distributed.init_process_group(
        "gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{_free_port()}"
    )
    try:
        parallel_state.initialize_model_parallel(1, 1)
        yield
    finally:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def make_mixer(megatron_single_rank: None) -> Callable[..., Any]:
    """Factory building a small float32 TorchMambaMixer on CPU.

    Defaults: d_model 64, d_state 16, headdim 16, ngroups 2, expand 2 (so
    d_inner 128 and 8 heads), d_conv 4, chunk_size 8.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
        from megatron.core.transformer import TransformerConfig

        from plugtron_mamba.torch_impl import TorchMambaMixer, TorchMambaMixerSubmodules

    def build(
        *, seed: int = 0, d_model: int = 64, chunk_size: int = 8, **overrides: Any
    ) -> TorchMambaMixer:
        cfg_kwargs = dict(
            num_layers=1,
            hidden_size=d_model,
            num_attention_heads=4,
            use_cpu_initialization=True,
            mamba_state_dim=16,
            mamba_head_dim=16,
            mamba_num_groups=2,
        )
        cfg_kwargs.update(overrides.pop("config", {}))
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = TransformerConfig(**cfg_kwargs)
            return TorchMambaMixer(
                config,
                TorchMambaMixerSubmodules(
                    in_proj=ColumnParallelLinear, out_proj=RowParallelLinear
                ),
                d_model=d_model,
                chunk_size=chunk_size,
                layer_number=1,
                **overrides,
            )

    return build
