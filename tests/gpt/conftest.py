"""Fixtures for the GPT family tests (CPU, one process).

megatron's parallel layers need torch.distributed and its model-parallel state
even in one CPU process: tests take plugtron's own pytest fixture
``plugtron_single_rank`` (:mod:`plugtron.testing`) for that.

The example configs under ``examples/configs/gpt`` double as the variant list:
every test that must cover "every variant" is parametrised over those files.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import pytest

SEED = 1234  # plugtron.runtime.parallel.initialize_parallel's default
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "configs" / "gpt"

#: A tiny Llama-style model; tests override what they exercise.
TINY: dict[str, Any] = dict(
    num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
    vocab_size=100, seq_length=32, hidden_dropout=0.0, attention_dropout=0.0,
    use_cpu_initialization=True, normalization="RMSNorm", gated_linear_unit=True, add_bias_linear=False,
)


def example_files() -> list[Path]:
    return sorted(EXAMPLES.glob("*.yaml"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``example`` parametrises a test over every example config, by file stem."""
    if "example" in metafunc.fixturenames:
        files = example_files()
        metafunc.parametrize("example", files, ids=[f.stem for f in files])


@pytest.fixture
def tiny_config() -> Callable[..., Any]:
    """``tiny_config(**overrides)`` -> a GPTModelConfig based on :data:`TINY` with SwiGLU."""
    import torch

    from plugtron_gpt.config import GPTModelConfig

    def make(**overrides: Any) -> Any:
        kwargs = dict(TINY, activation_func=torch.nn.functional.silu)
        kwargs.update(overrides)
        return GPTModelConfig(**kwargs)

    return make


@pytest.fixture
def build(plugtron_single_rank: Any) -> Callable[..., Any]:
    """``build(config, meta=False)`` -> BuiltModel through the shared pipeline.

    The module's parallel context is passed in, so ``build_model`` does not
    re-initialise model parallelism per build: each re-initialisation leaves
    megatron's previous process groups alive (~17 groups, ~70 file
    descriptors), which a long test module would pile up. The RNG is re-seeded
    as a re-initialisation would, so every build of a config is the same model.
    """
    from plugtron import BuildOptions
    from plugtron.pipeline import build_model
    from plugtron.runtime.cpu import seed_everything

    def run(config: Any, meta: bool = False) -> Any:
        seed_everything(SEED)
        return build_model(config, parallel=plugtron_single_rank, options=BuildOptions(meta_device=meta))

    return run


def check_grads(model: Any) -> None:
    """Every parameter has a finite gradient with at least one non-zero entry."""
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert param.grad.isfinite().all(), f"{name} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


@pytest.fixture
def train_step() -> Callable[..., Any]:
    """``train_step(built, batch=2, seq=16)`` -> loss: forward, backward, checks, one SGD step."""
    import torch

    def run(built: Any, batch: int = 2, seq: int = 16) -> float:
        model, builder = built.chunks[0], built.context.builder
        model.train()
        loss = builder.forward_step(model, builder.random_batch(batch, seq))
        assert loss.shape == (batch, seq)
        value = loss.mean()
        assert math.isfinite(value.item()) and value.item() > 0
        value.backward()
        check_grads(model)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
        assert len(changed) == len(before), "the optimizer step left parameters unchanged"
        return value.item()

    return run
