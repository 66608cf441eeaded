"""Smoke test of ``benchmarks/bench_mamba.py``: its measurement children run and compare like for like.

The benchmark's numbers are only meaningful if both sides really are the same
function on the same weights; this runs its speed child on a short sequence
(one step per side, in a fresh interpreter, as the benchmark does) and checks
the outputs agree, plus one memory child and the table printer.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_mamba.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_mamba_under_test", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_speed_child_compares_identical_mixers(bench) -> None:
    result = bench._child("child_speed", shape="small", seqs=[160], steps={"160": 1}, warmup=0)
    assert result["threads"] == 1
    for mode in ("fwd", "fwd+bwd"):
        r = result[f"{mode}@160"]
        assert r["max_abs_diff"] <= bench.DIFF_TARGET and r["scale"] > 0.1, r
        assert all(len(r["times"][side]) == 1 and r["times"][side][0] > 0 for side in ("plugtron", "reference"))


def test_memory_child_reports_the_step_alone(bench) -> None:
    result = bench._child("child_memory", shape="mamba2-130m", side="plugtron", seq=256)
    assert 0 < result["peak_delta_mb"] < 2000 and result["how"]


def test_table_marks_rows(bench, capsys) -> None:
    rows = [{"benchmark": "a", "plugtron": "1", "reference": "2", "ratio": "0.50x", "target": ">= 2x", "ok": False},
            {"benchmark": "b", "plugtron": "1", "reference": "1", "ratio": "", "target": "none", "ok": None}]
    bench._print(rows)
    out = capsys.readouterr().out.splitlines()
    assert out[0].split("|")[0].strip() == "benchmark" and "✗" in out[2] and "–" in out[3]


def _speed_and_memory(plugtron_s: float, reference_s: float) -> tuple:
    times = {"plugtron": [plugtron_s], "reference": [reference_s], "projections": [0.5]}
    speed = {f"{mode}@512": {"times": times, "walls": times, "max_abs_diff": 0.0, "scale": 1.0} for mode in ("fwd", "fwd+bwd")}
    memory = {(side, 512): {"peak_delta_mb": 1.0, "how": "test"} for side in ("plugtron", "reference")}
    return speed, memory


def test_speed_target_is_judged_on_the_target_shape_only(bench) -> None:
    for plugtron_s, met in ((1.0, True), (1.5, False)):  # reference 2.5 s: 2.5x and 1.67x
        speed, memory = _speed_and_memory(plugtron_s, 2.5)
        judged = [r for r in bench._shape_rows(bench.TARGET_SHAPE, [512], speed, memory) if "tokens" in r["benchmark"]]
        other = [r for r in bench._shape_rows("small", [512], speed, memory) if "tokens" in r["benchmark"]]
        assert [r["ok"] for r in judged] == [met, met]
        assert [r["ok"] for r in other] == [None, None] and all(bench.TARGET_SHAPE in r["target"] for r in other)


def test_unknown_shape_is_refused_by_name(bench) -> None:
    with pytest.raises(SystemExit, match="unknown shape.*'mamba2-9b'"):
        bench.run(quick=False, shapes=["mamba2-130m", "mamba2-9b"])
