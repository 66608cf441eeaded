"""Every architecture case at TP=2 (sequence parallel where the model needs it) and PP=2, in one
two-rank gloo launch: float32 logits parity against transformers and a bit-exact export
from the distributed model. Runs hfb_mp_worker.py's ``convert`` scenarios."""

from __future__ import annotations

import pytest

from arch_cases import all_cases, save_case
from hfb_helpers import run_scenarios

pytestmark = pytest.mark.multiprocess

CASES = all_cases()
RUNS = [(f"tp2 {c.name}", c, {"tp": 2}) for c in CASES if c.tp2] + [(f"pp2 {c.name}", c, {"pp": 2}) for c in CASES if c.pp2]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    if not RUNS:
        return {}
    tmp = tmp_path_factory.mktemp("arch_multirank")
    src = {c.name: save_case(tmp / c.name, c) for c in CASES}
    scenarios = [{"name": name, "kind": "convert", "src": str(src[c.name]), "seq": c.seq, **layout}
                 for name, c, layout in RUNS]
    return {r["name"]: r for r in run_scenarios(scenarios, tmp / "out", timeout=900)[0]}


@pytest.mark.parametrize("name", [r[0] for r in RUNS])
def test_float32_parity_and_bit_exact_export(results, name):
    r = results[name]
    assert r["diff"] <= 1e-4 and r["top1"] == 1.0 and r["cosine"] > 0.999999, r
    assert r["scale"] > 0.2, r
    assert r["mismatched"] == [], r
