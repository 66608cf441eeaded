"""Fixtures for the Mamba tests (mixer and family).

megatron's parallel layers need ``torch.distributed`` and megatron's model-parallel
state even on one CPU process: tests take plugtron's own pytest fixture
``plugtron_single_rank`` (:mod:`plugtron.testing`) for that.

Family tests build through the shared pipeline with :func:`build` on a tiny
hybrid config (:data:`TINY`, pattern ``M*M-``) that they override per test.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import pytest
import torch


@pytest.fixture(scope="module")
def make_mixer(plugtron_single_rank: Any) -> Callable[..., Any]:
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


# -- family tests ---------------------------------------------------------------

SEED = 1234  # plugtron.runtime.parallel.initialize_parallel's default

#: A tiny hybrid model (Mamba, attention, Mamba, MLP); tests override what they exercise.
TINY: dict[str, Any] = dict(
    num_layers=4, hybrid_override_pattern="M*M-", hidden_size=64, num_attention_heads=4,
    ffn_hidden_size=96, vocab_size=100, seq_length=32, mamba_state_dim=16, mamba_head_dim=16,
    mamba_num_groups=2, mamba_chunk_size=8, normalization="RMSNorm", add_bias_linear=False,
    hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
)


@pytest.fixture(scope="module")
def tiny_config() -> Callable[..., Any]:
    """``tiny_config(**overrides)`` -> a MambaModelConfig based on :data:`TINY`."""
    from plugtron_mamba.config import MambaModelConfig

    def make(**overrides: Any) -> Any:
        return MambaModelConfig(**{**TINY, **overrides})

    return make


@pytest.fixture(scope="module")
def build(plugtron_single_rank: Any) -> Callable[..., Any]:
    """``build(config, meta=False)`` -> BuiltModel through the shared pipeline, re-seeded per call."""
    from plugtron import BuildOptions
    from plugtron.pipeline import build_model
    from plugtron.runtime.cpu import seed_everything

    def run(config: Any, meta: bool = False) -> Any:
        seed_everything(SEED)
        return build_model(config, parallel=plugtron_single_rank, options=BuildOptions(meta_device=meta))

    return run
