"""End-to-end check of the layout facts: converted tensors give megatron-core the HF logits.

Round trips only prove the mapping is invertible; this proves it is *right*:
a megatron-core GPTModel (local spec, CPU) loaded with the converted tensors
must reproduce the HF model's logits, and its own state-dict names and shapes
must equal the bridge's.  Runs in a subprocess, see hfb_parity_worker.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("hfb_parity_worker.py")
CASES = ["llama", "llama_bias_tied", "mistral", "qwen2", "qwen3", "gpt2",
         "llama3_rope", "linear_rope", "qwen2_yarn", "qwen3_yarn_mscale"]


@pytest.fixture(scope="module")
def parity_results() -> dict[str, dict]:
    pytest.importorskip("megatron.core")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*sys.path, env.get("PYTHONPATH", "")])
    env.setdefault("HF_HUB_OFFLINE", "1")
    proc = subprocess.run([sys.executable, str(WORKER)], capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode:
        pytest.fail(f"parity worker failed (rc {proc.returncode}):\n{proc.stderr[-6000:]}")
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {r["case"]: r for r in results}


@pytest.mark.parametrize("case", CASES)
def test_megatron_logits_match_hf(parity_results: dict[str, dict], case: str) -> None:
    result = parity_results[case]
    assert result["diff"] <= 2e-5 * max(1.0, result["scale"]), result


@pytest.mark.parametrize("case", [c for c in CASES if "rope" in c or "yarn" in c])
def test_rope_scaling_cases_are_sensitive(parity_results: dict[str, dict], case: str) -> None:
    """The scaled-RoPE cases would fail if the scaling were dropped (the check has teeth)."""
    result = parity_results[case]
    assert result["rope_sensitivity"] > 100 * max(result["diff"], 1e-7), result
