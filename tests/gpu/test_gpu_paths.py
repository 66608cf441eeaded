"""GPU paths. They skip on CPU machines (ours and CI's); run them where CUDA exists:
``pytest -m gpu``. Not run by this project on a GPU yet."""

from __future__ import annotations

import pytest
import torch

from plugtron.builder import BuildOptions
from plugtron.manager import PlugtronPluginManager
from plugtron.pipeline import build_model

pytestmark = pytest.mark.gpu


def _config(**overrides):
    from plugtron_gpt.config import GPTModelConfig

    fields = dict(
        num_layers=2, hidden_size=128, num_attention_heads=4, vocab_size=256, seq_length=32,
        hidden_dropout=0.0, attention_dropout=0.0, bf16=True, params_dtype=torch.bfloat16,
    )
    fields.update(overrides)
    return GPTModelConfig(**fields)


def test_auto_picks_transformer_engine_and_trains_on_cuda():
    built = build_model(_config(), options=BuildOptions(wrap="ddp"), pm=PlugtronPluginManager())
    assert built.report.layer_spec == "te"
    assert built.context.device == "cuda" and built.context.parallel.backend == "nccl"
    batch = {k: v.cuda() for k, v in built.context.builder.random_batch(2, 16).items()}
    loss = built.context.builder.forward_step(built.chunks[0], batch)
    loss.float().mean().backward()
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("spec", ["torch", "local"])
def test_cpu_capable_specs_run_on_cuda(spec):
    built = build_model(_config(layer_spec=spec), pm=PlugtronPluginManager())
    assert next(built.chunks[0].parameters()).is_cuda


def test_megatron_fsdp_wraps_on_cuda():
    built = build_model(_config(layer_spec="te"), options=BuildOptions(wrap="megatron_fsdp"), pm=PlugtronPluginManager())
    assert type(built.chunks[0]).__name__ == "FullyShardedDataParallel"
