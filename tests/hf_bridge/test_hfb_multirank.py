"""Two gloo ranks, one torchrun launch: TP=2 and PP=2 parity for every architecture,
bit-exact round trips, a TP=2-saved distributed checkpoint loaded at PP=2, and the
``plugtron convert`` command on two ranks. See hfb_mp_worker.py.

The Mamba family's converters (plugtron-mamba) run in the same launch: Mamba2 and
the hybrid NemotronH at TP=2, whose in_proj ``[z|x|B|C|dt]`` and conv1d ``[x|B|C]``
are split block by block, with two groups so that B/C and the gated norm really are
divided group by group, and NemotronH at PP=2 and through a distributed checkpoint
saved at TP=2 and loaded at PP=2."""

from __future__ import annotations

from pathlib import Path

import pytest

from hfb_helpers import CASES, make_hf, run_scenarios
from plugtron_mamba.hf.tiny import save_tiny_hf

pytestmark = pytest.mark.multiprocess


#: Mamba family checkpoints (tiny, float32, 8 heads in 2 groups): name -> (architecture, tiny config options).
#: The NemotronH pattern has 8 layers, so that PP=2 gives each stage Mamba, attention and MLP layers.
MAMBA_CASES = {
    "mamba2": ("Mamba2ForCausalLM", {"vocab": 97}),
    "nemotron-h": ("NemotronHForCausalLM", {"pattern": "M*-MM-*M"}),
}


def _scenarios(src: dict[str, Path]) -> list[dict]:
    out = [{"name": f"tp2 {name}", "kind": "convert", "src": str(src[name]), "tp": 2} for name, *_ in CASES]
    out += [
        {"name": "pp2 llama", "kind": "convert", "src": str(src["llama"]), "pp": 2, "shard": 20_000},
        {"name": "pp2 gpt2-tied", "kind": "convert", "src": str(src["gpt2-tied"]), "pp": 2},
        {"name": "pp2 vp2 qwen3-tied", "kind": "convert", "src": str(src["qwen3-tied"]), "pp": 2, "vp": 2},
        # 21 tokens: not a multiple of the chunk size (8), so the SSD scan's padding runs too.
        *({"name": f"tp2 {name}", "kind": "convert", "src": str(src[name]), "tp": 2, "seq": 21} for name in MAMBA_CASES),
        {"name": "pp2 nemotron-h", "kind": "convert", "src": str(src["nemotron-h"]), "pp": 2, "seq": 21},
        {"name": "tp2 llama bf16", "kind": "convert", "src": str(src["llama-bf16"]), "tp": 2},
        {"name": "ckpt tp2 -> pp2", "kind": "ckpt", "src": str(src["llama"]), "save": {"tp": 2}, "load": {"pp": 2}},
        {"name": "ckpt pp2 tied -> tp2", "kind": "ckpt", "src": str(src["qwen3-tied"]), "save": {"pp": 2}, "load": {"tp": 2}},
        {"name": "ckpt nemotron-h tp2 -> pp2", "kind": "ckpt", "src": str(src["nemotron-h"]), "save": {"tp": 2},
         "load": {"pp": 2}},
        {"name": "cli convert tp2", "kind": "cli",
         "argv": ["convert", str(src["mistral"]), "OUT/cli-meg", "--to", "megatron", "--tp", "2", "--verify", "--no-progress"]},
        {"name": "cli export pp2", "kind": "cli",
         "argv": ["convert", "OUT/cli-meg", "OUT/cli-hf", "--to", "hf", "--pp", "2", "--no-progress"],
         "compare": [str(src["mistral"]), "OUT/cli-hf"]},
    ]
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("hfb_multirank")
    src = {name: make_hf(tmp / name, arch, tied=tied, vocab=vocab) for name, arch, tied, vocab in CASES}
    src["llama-bf16"] = make_hf(tmp / "llama-bf16", "LlamaForCausalLM", dtype="bfloat16", seed=1)
    src.update({name: save_tiny_hf(tmp / name, arch, **options) for name, (arch, options) in MAMBA_CASES.items()})
    scenarios = _scenarios(src)
    got = {r["name"]: r for r in run_scenarios(scenarios, tmp / "out")[0]}
    assert sorted(got) == sorted(s["name"] for s in scenarios)
    return got


CONVERTS = [f"tp2 {name}" for name, *_ in CASES] + ["pp2 llama", "pp2 gpt2-tied", "pp2 vp2 qwen3-tied"]
CONVERTS += [f"tp2 {name}" for name in MAMBA_CASES] + ["pp2 nemotron-h"]


@pytest.mark.parametrize("name", CONVERTS)
def test_float32_parity_and_bit_exact_round_trip(results, name):
    r = results[name]
    assert r["diff"] <= 1e-4 and r["top1"] == 1.0 and r["cosine"] > 0.999999, r
    assert r["scale"] > 0.5, r  # logits far from zero: the diff bound means something
    assert r["mismatched"] == [], r


def test_bf16_checkpoint_stays_bf16_at_tp2(results):
    r = results["tp2 llama bf16"]
    assert r["params_dtype"] == "torch.bfloat16" and r["mismatched"] == [], r
    assert r["top1"] >= 0.9 and r["cosine"] > 0.999, r


@pytest.mark.parametrize("name", ["ckpt tp2 -> pp2", "ckpt pp2 tied -> tp2", "ckpt nemotron-h tp2 -> pp2"])
def test_distributed_checkpoint_loads_at_another_layout(results, name):
    r = results[name]
    assert r["logits_diff"] <= 1e-5, r
    assert r["mismatched"] == [], r


def test_convert_command_on_two_ranks(results):
    assert results["cli convert tp2"]["code"] == 0
    r = results["cli export pp2"]
    assert r["code"] == 0 and r["mismatched"] == [], r
