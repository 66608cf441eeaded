"""Freezing one copy of a tied embedding at PP=2 freezes the weight; the step never hangs.

The hook is the ``plugtron_pre_wrap`` docstring's example (freeze the
embedding of every chunk that has one): at PP=2 only the first stage has an
``embedding``, so before the fix the last stage alone entered the tied-grad
all-reduce and the step waited for the process-group timeout. One torchrun
job (:mod:`tied_freeze_worker`) runs the plain step and ``wrap="ddp"`` with a
20 s process-group timeout; the subprocess timeout keeps a regression from
hanging the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiprocess

WORKER = Path(__file__).with_name("tied_freeze_worker.py")
GROUP_TIMEOUT_S = 20
JOB_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[list[dict]]:
    """Per rank, one record per wrap kind (``none``, ``ddp``)."""
    out = tmp_path_factory.mktemp("tied") / "results.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=0",
        str(WORKER), "--out", str(out), "--wraps", "none,ddp", "--timeout-s", str(GROUP_TIMEOUT_S),
    ]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=JOB_TIMEOUT_S, env={**os.environ, "OMP_NUM_THREADS": "1"})
    elapsed = time.perf_counter() - started
    assert proc.returncode == 0, f"job failed after {elapsed:.0f} s (a hang ends at the {GROUP_TIMEOUT_S} s timeout):\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("index, wrap", [(0, "none"), (1, "ddp")])
def test_freeze_reaches_both_stages_and_the_step_finishes(ranks, index, wrap):
    first, last = (rank[index] for rank in ranks)
    for record in (first, last):
        assert record["wrap"] == wrap and "error" not in record, record
        assert record["tied_requires_grad"] is False and record["tied_grad_is_none"], record
        assert record["others_have_grads"] and record["trainable"] > 0, record
        assert record["seconds"] < GROUP_TIMEOUT_S, record  # no rank waited on a missing peer
    assert first["loss"] is None and 0.0 < last["loss"] < 20.0
    assert first["warnings"] == []  # the hook froze this copy itself
    (warning,) = last["warnings"]
    assert "output_layer.weight (pipeline stage 1)" in warning
    assert "embedding.word_embeddings.weight (pipeline stage 0)" in warning


def test_plain_and_ddp_steps_agree(ranks):
    """Same seed, same frozen weight: megatron DDP and the plain step give one loss."""
    last = ranks[1]
    assert last[0]["loss"] == pytest.approx(last[1]["loss"], abs=1e-5)
