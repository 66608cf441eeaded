"""Architecture variants under TP=2 (sequence parallel on and off) and PP=2: the single-process numbers.

One 2-rank gloo job (:mod:`plugtron.parity`) loads the single-process
reference weights into each layout's slices and compares logits, loss and
every gradient (gathered to full tensors under global names). Two references:

* Olmo2-like: full-width q/k RMSNorm (its weight TP-split along dim 0; the
  sum of squares all-reduced over TP, forward and backward) and post-only
  norms (no pre-norms).
* Gemma-like: sandwich norms with zero-centred gamma, per-head zero-centred
  q/k norms (their grads summed over TP whether or not sequence parallelism
  is on), alternating sliding windows with a local RoPE base, attention and
  final soft-capping, embedding and residual multipliers.
"""

from __future__ import annotations

import pytest
import torch

from plugtron import hookimpl, parity

pytestmark = pytest.mark.multiprocess

BASE = dict(
    num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128, vocab_size=128,
    make_vocab_size_divisible_by=64, seq_length=16, normalization="RMSNorm", gated_linear_unit=True, add_bias_linear=False,
    hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, layer_spec="torch",
)
REFERENCES = {
    "olmo": dict(norm_placement="post", qk_layernorm=True, qk_norm_scope="full", logits_divisor=2.0),
    "gemma": dict(
        layernorm_zero_centered_gamma=True, norm_placement="sandwich", qk_layernorm=True, window_size=[5, 0],
        window_attn_skip_freq=2, rotary_base=500000, rotary_base_local=10000.0, attention_softcap=5.0,
        final_logit_softcap=3.0, embedding_multiplier=8.0, embedding_multiplier_cast=True, residual_multiplier=0.8,
    ),
}
SCENARIOS = [
    {"name": "olmo tp=2 sp", "ref": "olmo", "tp": 2, "sp": True},
    {"name": "gemma tp=2 sp", "ref": "gemma", "tp": 2, "sp": True},
    {"name": "gemma tp=2", "ref": "gemma", "tp": 2, "sp": False},  # per-head q/k norm grads summed without SP too
    {"name": "gemma pp=2", "ref": "gemma", "pp": 2},  # windows and local RoPE by global layer number
]


def _config(overrides: dict):
    from plugtron_gpt.config import GPTModelConfig

    return GPTModelConfig(**BASE, activation_func=torch.nn.functional.silu, **overrides)


class _PerturbNorms:
    """Norm weights start constant; give them values so a wrong shard or a missing TP sum shows."""

    @hookimpl
    def plugtron_pre_wrap(self, model: list, config, context) -> None:
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, param in model[0].named_parameters():
                if "norm" in name:
                    param.add_(torch.randn(param.shape, generator=gen) * 0.3)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    from plugtron.manager import PlugtronPluginManager

    references = {}
    for name, overrides in REFERENCES.items():
        pm = PlugtronPluginManager()
        pm.register(_PerturbNorms(), name="perturb-norms")
        references[name] = parity.reference(_config(overrides), pm=pm)
    return parity.run(references, SCENARIOS, tmp_path_factory.mktemp("variants"))


@pytest.mark.parametrize("name", [s["name"] for s in SCENARIOS])
def test_layout_matches_single_process(results: dict, name: str) -> None:
    result = results[name]
    assert result["params_checked"] > 0
    assert result["max_logits_diff"] is not None and result["max_logits_diff"] < 1e-5, result
    assert result["loss"] == pytest.approx(result["ref_loss"], abs=1e-5), result
    assert result["max_grad_diff"] < 1e-5, result
