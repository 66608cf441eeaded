"""``plugtron plugins``: wall time of the real console script, and whether torch loads.

Wall time is measured from the parent around a fresh process (startup
included), like ``python -c pass``, the reference. Whether torch (or
megatron) got imported is read from ``python -X importtime`` of the same
console script, so the check sees exactly what the command imports.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from _measure import REPO, child_env, median, time_command

HEAVY = ("torch", "megatron")


def console_script() -> list[str]:
    script = Path(sys.executable).with_name("plugtron")
    if not script.exists():
        raise FileNotFoundError(f"{script} not found: is plugtron installed in this environment?")
    return [str(script), "plugins"]


def imported_modules(argv: list[str]) -> set[str]:
    """Top-level packages imported by ``argv`` (a Python console script)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *argv], capture_output=True, text=True, env=child_env(), cwd=REPO
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr[-2000:]}")
    names = set()
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name and name != "package":
                names.add(name.split(".")[0])
    return names


def measure(repeats: int = 5) -> dict[str, Any]:
    argv = console_script()
    time_command(argv, 1)  # warm the page cache for both sides alike
    time_command([sys.executable, "-c", "pass"], 1)
    mine: list[float] = []
    ref: list[float] = []
    for _ in range(repeats):  # interleaved, so bursts of load hit both
        mine += time_command(argv, 1)
        ref += time_command([sys.executable, "-c", "pass"], 1)
    modules = imported_modules(argv)
    return {
        "plugtron_s": median(mine),
        "python_s": median(ref),
        "plugtron_samples": mine,
        "python_samples": ref,
        "heavy_imported": sorted(m for m in HEAVY if m in modules),
    }
