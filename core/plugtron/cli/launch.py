"""Re-launching a command under torchrun when it needs more than one rank.

torchrun's agent stops every worker as soon as one fails (``--max-restarts 0``),
and plugtron's process groups carry a short timeout, so a failure on one rank
ends the whole job quickly instead of leaving peers waiting in a collective.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Sequence

FAILURE_TIMEOUT_S = 60.0


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def relaunch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``python -m plugtron.cli ARGV`` on ``nproc`` local ranks; return the exit code."""
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", "--monitor-interval=0.2",
        "-m", "plugtron.cli", *argv,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.call(command, env=env)
