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

import warnings

import pytest
import torch.nn.functional as F

from plugtron import parity

pytestmark = pytest.mark.multiprocess

SCENARIOS = [
    {"name": "tp=2 hybrid", "ref": "hybrid", "tp": 2, "checkpoint_keys": True},
    {"name": "tp=2 tied", "ref": "tied", "tp": 2, "checkpoint_keys": True},
    # megatron's DDP all-reduces the grads of sequence-parallel norm weights over TP (see the report)
    {"name": "tp=2 sequence-parallel ddp", "ref": "hybrid", "tp": 2, "sp": True, "wrap": "ddp"},
    {"name": "tp=2 sequence-parallel", "ref": "hybrid", "tp": 2, "sp": True},
    {"name": "pp=2 hybrid", "ref": "hybrid", "pp": 2, "checkpoint_keys": True},
    {"name": "pp=2 tied", "ref": "tied", "pp": 2, "checkpoint_keys": True},
    {"name": "pp=2 vp=2 hybrid", "ref": "hybrid", "pp": 2, "vp": 2, "checkpoint_keys": True},
]
REFERENCES = {
    "hybrid": dict(hybrid_override_pattern="M*M-", position_embedding_type="rope", gated_linear_unit=True, activation_func=F.silu),
    "tied": dict(hybrid_override_pattern="MM*M", normalization="LayerNorm", add_bias_linear=True,
                 position_embedding_type="learned_absolute", share_embeddings_and_output_weights=True),
}


@pytest.fixture(scope="module")
def layout_results(tmp_path_factory, tiny_config, build) -> dict:
    with warnings.catch_warnings():  # megatron's deprecation noise; the autouse filter is per test only
        warnings.simplefilter("ignore")
        build(tiny_config())  # the module's single-rank group, before the references use it
        # vocab 128 padded to a multiple of 64: the same padded size at TP=1 and TP=2
        references = {
            name: parity.reference(tiny_config(vocab_size=128, make_vocab_size_divisible_by=64, **overrides))
            for name, overrides in REFERENCES.items()
        }
    return parity.run(references, SCENARIOS, tmp_path_factory.mktemp("mamba_layouts"))


@pytest.mark.parametrize("name", [s["name"] for s in SCENARIOS])
def test_layout_matches_single_process(layout_results, name):
    result = layout_results[name]
    assert result["params_checked"] > 0
    assert result["max_logits_diff"] < 1e-5, result
    assert result["loss"] == pytest.approx(result["ref_loss"], abs=1e-5), result
    assert result["max_grad_diff"] < 1e-5, result


@pytest.mark.parametrize("name", [s["name"] for s in SCENARIOS if s.get("checkpoint_keys")])
def test_checkpoint_keys_use_global_layer_numbers(layout_results, name):
    assert layout_results[name]["checkpoint_keys_match"], layout_results[name]
