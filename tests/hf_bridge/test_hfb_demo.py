"""``plugtron hf-demo`` (what ``make demo`` runs) succeeds end to end on a CPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def test_hf_demo(tmp_path) -> None:
    done = subprocess.run([sys.executable, "-m", "plugtron.cli", "hf-demo", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "bit-exact" in output and "config.json equal" in output and "✗" not in output, output
    assert sorted(p.name for p in tmp_path.iterdir()) == [".plugtron-hf-demo", "hf", "hf-roundtrip", "megatron-tp2"]
