"""NemotronH with MoE layers at expert-parallel layouts, one two-rank gloo launch.

Reuses the HF bridge's worker (``tests/hf_bridge/hfb_mp_worker.py``, scenario kind
``moe``): import at the layout, float32 logits parity against transformers, each
rank's bytes read, and a bit-exact export gathered one expert at a time.

* EP=2 (TP=1): each rank holds 4 of the 8 experts of every ``E`` layer;
* TP=2 x EP=2 (ETP=1): Mamba, attention, MLP and shared expert split over TP
  (sequence parallelism switched on, as megatron requires for MoE at TP > 1),
  routed experts over EP;
* PP=2 (scenario kind ``convert``): MoE layers on both pipeline stages.

Each rank's routed-expert bytes equal exactly the bytes of its own experts in
the checkpoint: no rank reads another rank's experts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from plugtron_mamba.hf.tiny import TINY_MOE, save_tiny_moe_hf

pytestmark = pytest.mark.multiprocess

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf_bridge"))
from hfb_helpers import expert_bytes, run_scenarios  # noqa: E402  (the bridge's two-rank scenario runner)
RUNS = {"ep2": {"ep": 2}, "tp2 ep2": {"tp": 2, "ep": 2, "etp": 1}}
PP_PATTERN = "EM*E-ME*"


@pytest.fixture(scope="module")
def launch(tmp_path_factory) -> tuple[dict[str, dict], Path]:
    tmp = tmp_path_factory.mktemp("nemotron_h_moe_mp")
    src = save_tiny_moe_hf(tmp / "hf")
    scenarios = [{"name": name, "kind": "moe", "src": str(src), **layout} for name, layout in RUNS.items()]
    even = save_tiny_moe_hf(tmp / "hf8", pattern=PP_PATTERN)  # megatron's Mamba stages split layers evenly
    scenarios.append({"name": "pp2", "kind": "convert", "src": str(even), "pp": 2})
    return {r["name"]: r for r in run_scenarios(scenarios, tmp / "out")[0]}, src


@pytest.mark.parametrize("name", list(RUNS))
def test_float32_parity_and_bit_exact_export(launch, name) -> None:
    r = launch[0][name]
    assert r["diff"] <= 1e-4 and r["top1"] == 1.0 and r["cosine"] > 0.999999 and r["scale"] > 1.0, r
    assert r["mismatched"] == [], r


def test_pipeline_parallel_parity_and_bit_exact_export(launch) -> None:
    """PP=2: the stages split the pattern EM*E|-ME* (MoE layers on both stages, global layer numbers)."""
    r = launch[0]["pp2"]
    assert r["diff"] <= 1e-4 and r["top1"] == 1.0 and r["mismatched"] == [], r


@pytest.mark.parametrize("name", list(RUNS))
def test_each_rank_reads_only_its_experts(launch, name) -> None:
    results, src = launch
    r = results[name]
    per, local = expert_bytes(src), TINY_MOE["n_routed_experts"] // 2
    assert r["ep_ranks"] == [0, 1]
    for reads, ep_rank in zip(r["reads"], r["ep_ranks"]):
        mine = sum(per[e] for e in range(ep_rank * local, (ep_rank + 1) * local))
        assert reads["expert_bytes"] == mine and 0 < mine < sum(per.values()), (reads, mine)
