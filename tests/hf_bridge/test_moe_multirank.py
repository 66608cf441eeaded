"""MoE checkpoints at expert-parallel layouts, in one two-rank gloo launch (hfb_mp_worker.py).

* EP=2 (TP=1) and TP=2 with EP=2 (ETP=1: dense parts and shared experts split over TP,
  routed experts over EP) for every architecture, and TP=2 with ETP=1 for OLMoE (experts
  whole on both ranks): float32 logits parity against transformers and a bit-exact export
  gathered one expert at a time. (TP=2 with ETP=2 runs in ``test_arch_multirank.py``.)
* Each rank of an EP=2 layout reads exactly its own experts' bytes: the loader's byte
  count for routed experts equals the bytes of the experts ``[ep_rank x 2, ep_rank x 2 + 2)``
  in the checkpoint, so no rank touches another rank's experts.
* ``plugtron convert --ep 2`` to megatron, then back to HF at ``--tp 2`` (expert TP=2): the
  distributed checkpoint reshards experts across expert layouts, bit-exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from arch_cases import save_case
from hfb_helpers import expert_bytes, run_scenarios
from arch_cases.moe import MIXTRAL, OLMOE, QWEN2_MOE, QWEN3_MOE

pytestmark = pytest.mark.multiprocess

LOCAL_EXPERTS = 2  # four experts over EP=2
#: Every architecture at EP=2 and at TP=2 with EP=2 (expert TP 1: dense parts split over TP, experts over EP).
RUNS = [(f"ep2 {c.name}", c, {"ep": 2}) for c in (QWEN3_MOE, MIXTRAL, QWEN2_MOE, OLMOE)]
RUNS += [(f"tp2 ep2 {c.name}", c, {"tp": 2, "ep": 2, "etp": 1}) for c in (QWEN3_MOE, MIXTRAL, QWEN2_MOE, OLMOE)]
RUNS += [("tp2 etp1 olmoe", OLMOE, {"tp": 2, "etp": 1})]


@pytest.fixture(scope="module")
def launch(tmp_path_factory) -> tuple[dict[str, dict], dict[str, Path], str]:
    """(results by scenario name, the HF source directories by case, rank 0's stdout)."""
    tmp = tmp_path_factory.mktemp("moe_multirank")
    src = {c.name: save_case(tmp / c.name, c) for c in (QWEN3_MOE, MIXTRAL, QWEN2_MOE, OLMOE)}
    scenarios = [{"name": name, "kind": "moe", "src": str(src[c.name]), **layout} for name, c, layout in RUNS]
    scenarios += [
        {"name": "cli to megatron ep2", "kind": "cli",
         "argv": ["convert", str(src["mixtral"]), "OUT/mixtral-meg", "--to", "megatron", "--ep", "2", "--no-progress"]},
        {"name": "cli to hf tp2", "kind": "cli", "compare": [str(src["mixtral"]), "OUT/mixtral-hf"],
         "argv": ["convert", "OUT/mixtral-meg", "OUT/mixtral-hf", "--to", "hf", "--tp", "2", "--no-progress"]},
    ]
    results, stdout = run_scenarios(scenarios, tmp / "out")
    return {r["name"]: r for r in results}, src, stdout


@pytest.mark.parametrize("name", [r[0] for r in RUNS])
def test_float32_parity_and_bit_exact_export_at_expert_layouts(launch, name) -> None:
    r = launch[0][name]
    assert r["diff"] <= 1e-4 and r["top1"] == 1.0 and r["cosine"] > 0.999999 and r["scale"] > 0.2, r
    assert r["mismatched"] == [], r


@pytest.mark.parametrize("name,case", [("ep2 qwen3_moe", "qwen3_moe"), ("ep2 mixtral", "mixtral"),
                                       ("tp2 ep2 qwen2_moe", "qwen2_moe")])
def test_each_rank_reads_only_its_own_experts_bytes(launch, name, case) -> None:
    results, src, _ = launch
    r, per_expert = results[name], expert_bytes(src[case])
    for reads, ep_rank in zip(r["reads"], r["ep_ranks"]):
        mine = range(ep_rank * LOCAL_EXPERTS, (ep_rank + 1) * LOCAL_EXPERTS)
        assert reads["expert_bytes"] == sum(per_expert[e] for e in mine), (reads, per_expert)
    assert sum(reads["expert_bytes"] for reads in r["reads"]) == sum(per_expert.values())


def test_cli_ep2_checkpoint_reshards_to_expert_tp2_bit_exactly(launch) -> None:
    results, _, text = launch
    assert results["cli to megatron ep2"]["code"] == 0 and results["cli to hf tp2"]["code"] == 0
    assert results["cli to hf tp2"]["mismatched"] == []
    assert "tp=1 pp=1 ep=2 etp=1" in text and "bytes read from the checkpoint per rank" in text, text[-3000:]
