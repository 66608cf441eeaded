"""Every example config loads, builds through the shared pipeline and trains one step.

The example files are what users copy and what the ``plugtron build`` CLI
test runs, so each must stay tiny, deterministic (no dropout) and CPU-ready.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from plugtron.config import load

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "configs" / "gpt"
EXPECTED = {
    "llama_rope", "llama3_scaling", "rope_interpolation", "yarn", "mrope",
    "gpt2_learned_absolute", "no_position", "mtp", "qknorm_gqa",
}


def test_every_variant_has_an_example() -> None:
    assert EXPECTED <= {f.stem for f in EXAMPLES.glob("*.yaml")}


def test_example_is_tiny_and_deterministic(example: Path) -> None:
    data = yaml.safe_load(example.read_text())
    assert data["family"] == "gpt"
    assert data["hidden_dropout"] == 0.0 and data["attention_dropout"] == 0.0
    assert data["use_cpu_initialization"] is True
    assert data["num_layers"] <= 4 and data["hidden_size"] <= 128 and data["vocab_size"] <= 1024


def test_example_builds_and_trains_one_step(example: Path, build, train_step) -> None:
    config = load(example)
    built = build(config)
    assert built.report.family == "gpt"
    if not torch.cuda.is_available():
        assert built.report.layer_spec == "torch"  # what auto picks without CUDA
    train_step(built)


def test_build_model_sets_up_parallelism_itself(plugtron_single_rank, train_step) -> None:
    """Without a parallel context build_model (re-)initialises TP = PP = 1 on the one-rank group."""
    from plugtron.pipeline import build_model

    built = build_model(load(EXAMPLES / "llama_rope.yaml"))
    assert (built.context.parallel.tp, built.context.parallel.pp, built.context.parallel.world_size) == (1, 1, 1)
    train_step(built)


def test_example_builds_with_the_local_spec(example: Path, build, train_step) -> None:
    """megatron's own modules (DotProductAttention on the CPU runtime) train every variant too."""
    config = load(example)
    config.layer_spec = "local"
    train_step(build(config))


@pytest.mark.parametrize("name,kind", [("gpt2_learned_absolute", "learned_absolute"), ("no_position", "none"), ("mrope", "mrope")])
def test_example_position_embedding(name: str, kind: str) -> None:
    assert load(EXAMPLES / f"{name}.yaml").position_embedding_type == kind
