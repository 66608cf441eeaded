"""Same weights, same data, TP/PP/VP layouts: same logits, loss and gradients as one process.

One torchrun launch (2 gloo ranks) runs every scenario, so the suite pays the
process start-up once. The reference runs in this process. Two models: a hybrid
``M*M-`` (RMSNorm, RoPE, SwiGLU, untied) and ``MM*M`` (LayerNorm, biases, learned
positions, tied embeddings). TP=2 exercises the block-wise split of the mixer's
fused ``in_proj`` and ``conv1d`` (:mod:`plugtron_mamba.tp_layout`); PP=2 splits
the pattern across stages; VP=2 gives each virtual stage one layer; sequence
parallelism runs the norms on sequence shards (the mixer sees the gathered sequence).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from plugtron.config import to_dict
from plugtron.training import forward_backward

pytestmark = pytest.mark.multiprocess

WORKER = Path(__file__).with_name("mamba_layout_worker.py")
SCENARIOS = [
    {"name": "tp=2 hybrid", "ref": "hybrid", "tp": 2},
    {"name": "tp=2 tied", "ref": "tied", "tp": 2},
    # megatron's DDP all-reduces the grads of sequence-parallel norm weights over TP (see the report)
    {"name": "tp=2 sequence-parallel ddp", "ref": "hybrid", "tp": 2, "sp": True, "wrap": "ddp"},
    {"name": "tp=2 sequence-parallel", "ref": "hybrid", "tp": 2, "sp": True},
    {"name": "pp=2 hybrid", "ref": "hybrid", "pp": 2},
    {"name": "pp=2 tied", "ref": "tied", "pp": 2},
    {"name": "pp=2 vp=2 hybrid", "ref": "hybrid", "pp": 2, "vp": 2},
]
REFERENCES = {
    "hybrid": dict(hybrid_override_pattern="M*M-", position_embedding_type="rope", gated_linear_unit=True, activation_func=F.silu),
    "tied": dict(hybrid_override_pattern="MM*M", normalization="LayerNorm", add_bias_linear=True,
                 position_embedding_type="learned_absolute", share_embeddings_and_output_weights=True),
}


def _reference(tiny_config, build, overrides: dict) -> dict:
    # vocab 128 padded to a multiple of 64: the same padded size at TP=1 and TP=2
    config = tiny_config(vocab_size=128, make_vocab_size_divisible_by=64, **overrides)
    saved = to_dict(config)
    built = build(config)
    model, builder = built.chunks[0], built.context.builder
    batches = [builder.random_batch(2, 16, seed=10 + i) for i in range(4)]
    with torch.no_grad():
        logits = [builder.forward_step(model, dict(batch, labels=None)).clone() for batch in batches]
    loss = forward_backward(built, batches)
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return {"config": saved, "state": state, "grads": grads, "loss": loss, "batches": batches, "logits": logits}


@pytest.fixture(scope="module")
def layout_results(tmp_path_factory, tiny_config, build) -> dict:
    tmp = tmp_path_factory.mktemp("mamba_layouts")
    with warnings.catch_warnings():  # megatron's deprecation noise; the autouse filter is per test only
        warnings.simplefilter("ignore")
        refs = {name: _reference(tiny_config, build, o) for name, o in REFERENCES.items()}
    torch.save(refs, tmp / "ref.pt")
    out = tmp / "results.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=0",
        str(WORKER), "--ref", str(tmp / "ref.pt"), "--scenarios", json.dumps(SCENARIOS), "--out", str(out),
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {r["name"]: r for r in json.loads(out.read_text())}


@pytest.mark.parametrize("name", [s["name"] for s in SCENARIOS])
def test_layout_matches_single_process(layout_results, name):
    result = layout_results[name]
    assert result["params_checked"] > 0
    assert result["max_logits_diff"] < 1e-5, result
    assert result["loss"] == pytest.approx(result["ref_loss"], abs=1e-5), result
    assert result["max_grad_diff"] < 1e-5, result


@pytest.mark.parametrize("name", [s["name"] for s in SCENARIOS])
def test_checkpoint_keys_use_global_layer_numbers(layout_results, name):
    assert layout_results[name]["checkpoint_keys_match"], layout_results[name]
