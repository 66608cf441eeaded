"""The example third-party distribution, used the way a user would use it."""

from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

import pytest

from plugtron.config import from_dict

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:megatron"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plugtron-example-plugin"


def test_distribution_metadata_and_entry_point():
    dist = md.distribution("plugtron-example-plugin")
    assert dist.version == "0.1.0"
    [ep] = [ep for ep in dist.entry_points if ep.group == "plugtron"]
    assert (ep.name, ep.value) == ("example", "plugtron_example.plugin")


def test_plugin_module_imports_neither_torch_nor_megatron():
    code = (
        "import sys, plugtron_example.plugin, plugtron_example.config\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'megatron'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout
    assert out.strip() == "[]"


def test_readme_config_is_a_valid_toy_config(plugtron_manager_factory):
    import yaml

    readme = (EXAMPLE / "README.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", readme, re.S).group(1)
    config = from_dict(yaml.safe_load(block), plugtron_manager_factory(env={"PLUGTRON_PLUGINS": "example"}))
    assert type(config).__name__ == "ToyConfig"
    assert (config.vocab_size, config.seq_length, config.layer_spec, config.num_layers) == (256, 64, "local", 2)


@pytest.fixture
def single_rank():
    """A one-rank gloo group (``initialize_parallel`` also switches the CPU runtime on)."""
    from plugtron.runtime import parallel

    # Reuses the process's single-rank group when another test made it first.
    return parallel.initialize_parallel(1, 1)


def test_toy_model_builds_trains_and_runs_the_post_wrap_hook(single_rank):
    from plugtron import PlugtronPluginManager
    from plugtron.pipeline import build_model
    from plugtron_example.builder import ToyBuilder
    from plugtron_example.config import ToyConfig

    pm = PlugtronPluginManager(env={"PLUGTRON_PLUGINS": "example"})
    config = ToyConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=96, seq_length=16,
                       use_cpu_initialization=True)
    built = build_model(config, parallel=single_rank, pm=pm)
    builder = built.context.builder
    assert type(builder) is ToyBuilder
    assert [type(c).__name__ for c in built.chunks] == ["GPTModel"]
    [chunk] = built.chunks
    assert chunk.plugtron_example_seen is True  # the example's plugtron_post_wrap ran
    assert built.report.layer_spec == "local"
    assert built.report.spec_reason == "auto: best available (megatron-core modules only, runs on CPU and GPU)"
    assert chunk.embedding.word_embeddings.weight.shape == (96, 32)
    assert chunk.embedding.position_embeddings.weight.shape == (16, 32)

    batch = builder.random_batch(2, 8, seed=3)
    assert batch["tokens"].shape == batch["labels"].shape == batch["position_ids"].shape == (2, 8)
    assert (batch["tokens"][:, 1:] == batch["labels"][:, :-1]).all()
    loss = builder.forward_step(chunk, batch)
    assert loss.shape == (2, 8) and loss.isfinite().all()
    loss.sum().backward()
    assert all(p.grad is not None for p in chunk.parameters() if p.requires_grad)
