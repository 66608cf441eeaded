"""Timing and memory helpers shared by the benchmarks.

Every measurement that touches torch runs in a fresh interpreter
(:func:`run_isolated`), so import caches, allocator state and the peak
resident set size belong to that one measurement alone. This module itself
imports nothing heavy: the parent process never loads torch.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MARKER = "@@BENCH-RESULT@@ "


class BenchError(RuntimeError):
    """A child measurement failed; carries the tail of its output."""


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def build_summary(shape: str, mine: list[dict[str, Any]], ref: list[dict[str, Any]],
                  rss: Callable[[list[float]], float] = median) -> dict[str, Any]:
    """What every build comparison reports: median seconds, the samples, peak RSS reduced by ``rss``
    and whether both sides built the same number of parameters."""
    return {
        "shape": shape,
        "plugtron_s": median([r["seconds"] for r in mine]),
        "direct_s": median([r["seconds"] for r in ref]),
        "plugtron_samples": [r["seconds"] for r in mine],
        "direct_samples": [r["seconds"] for r in ref],
        "plugtron_rss_mb": rss([r["peak_rss_mb"] for r in mine]),
        "direct_rss_mb": rss([r["peak_rss_mb"] for r in ref]),
        "params": mine[0]["params"],
        "same_params": all(r["params"] == ref[0]["params"] for r in mine + ref),
    }


def peak_rss_mb() -> float:
    """Peak resident set size of *this* process in MiB (VmHWM, else ru_maxrss)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def current_rss_mb() -> float:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.seconds``."""

    def __enter__(self) -> "Stopwatch":
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self._start


PLUGTRON_PACKAGES = ("plugtron", "plugtron_gpt", "plugtron_mamba", "plugtron_hf_bridge")


def ensure_bytecode(*folders: str | Path) -> None:
    """Write the bytecode caches of plugtron's packages (and of ``folders``) before anything is timed.

    Why: an editable install has no ``__pycache__`` until a first run writes
    one, and never gets one where ``PYTHONDONTWRITEBYTECODE`` is set (this
    machine's shell sets it): every plugtron process then compiled each of its
    modules from source, 53 modules and 0.05 s in the ``convert`` launcher alone
    (measured), a cost that an installed wheel never has (pip compiles at
    install time) and that the floors, which import only compiled site-packages,
    never pay. Writes ``__pycache__`` folders next to the sources (git ignores
    them); up-to-date caches are left alone. Imports none of the packages.
    """
    import compileall
    import importlib.util

    roots = [Path(folder) for folder in folders]
    for name in PLUGTRON_PACKAGES:
        spec = importlib.util.find_spec(name)
        roots += [Path(location) for location in (spec.submodule_search_locations or [])] if spec else []
    for root in roots:
        compileall.compile_dir(root, quiet=1)


def read_once(directory: str | Path) -> None:
    """Read every file under ``directory`` once, untimed, so that the timed sides read it from the page cache.

    Why: plugtron writes torch_dist files around the page cache (``O_DIRECT``,
    :mod:`plugtron.runtime.direct_write`), while the floors' inputs went through it
    when they were written. Without this, whichever run reads a freshly converted
    megatron checkpoint first would be the only one to read the disk. The rows compare
    reading and converting the same bytes; benchmarks/README.md shows a read from disk.
    """
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                while handle.read(64 << 20):
                    pass


def free_memory_text() -> str:
    """Free memory and page cache now (``/proc/meminfo``), for a benchmark's title line.

    Why: with little memory free (page cache from other files filling it), every
    fresh page a conversion takes goes through reclaim. Measured here: the same
    MoE benchmark gave the 1-rank import 1.48x / 1.57x its floor with 8.8 GB free
    beside 13.8 GB of page cache, and 1.18x with 14.5 GB free; the conversions,
    which take more fresh memory than their floors, slowed more.
    """
    try:
        with open("/proc/meminfo") as meminfo:
            fields = {line.split(":")[0]: int(line.split()[1]) for line in meminfo}
        return f"{fields['MemFree'] / 2**20:.1f} GiB free, {fields['Cached'] / 2**20:.1f} GiB page cache"
    except (OSError, KeyError, ValueError, IndexError):
        return "free memory unknown"


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")  # megatron warns about apex/TE on every import
    return env


def time_command(argv: Sequence[str], repeats: int, *, env: dict[str, str] | None = None) -> list[float]:
    """Wall time of ``argv`` run ``repeats`` times, each a new process (output discarded)."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env or child_env(), cwd=REPO)
        samples.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise BenchError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.decode()[-2000:]}")
    return samples


_forkserver: Any = None


def call(target: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    module_name, function_name = target.split(":")
    return getattr(importlib.import_module(module_name), function_name)(**kwargs)


def _forked_main(conn: Any, target: str, kwargs: dict[str, Any]) -> None:
    warnings.simplefilter("ignore")
    devnull = os.open(os.devnull, os.O_WRONLY)  # keep the workers' own prints out of the table
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    try:
        result = call(target, kwargs)
        result.setdefault("peak_rss_mb", peak_rss_mb())
        conn.send(("ok", result))
    except BaseException:  # noqa: BLE001 - reported to the parent
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def run_forked(target: str, timeout: float = 600.0, **kwargs: Any) -> dict[str, Any]:
    """Run ``module:function(**kwargs)`` in a new process forked from a preloaded server.

    A fresh process per measurement, as :func:`run_isolated`, minus the ~5 s
    of importing torch and megatron-core each time: multiprocessing's
    forkserver imports the build path once and forks every child from that.
    Timings never include imports anyway. Not for peak-RSS targets: a forked
    child shares (and may not count) pages mapped before the fork.
    """
    global _forkserver
    import multiprocessing

    if _forkserver is None:
        import _models

        os.environ.setdefault("PYTHONWARNINGS", "ignore")
        _forkserver = multiprocessing.get_context("forkserver")
        # what every measurement imports (torch, megatron-core, plugtron), loaded once
        _forkserver.set_forkserver_preload(["_models", *_models.BUILD_MODULES, *_models.PLUGTRON_MODULES])
    parent, child = _forkserver.Pipe(duplex=False)
    process = _forkserver.Process(target=_forked_main, args=(child, target, kwargs), daemon=True)
    process.start()
    child.close()
    try:
        if not parent.poll(timeout):
            process.kill()
            raise BenchError(f"{target} timed out after {timeout:.0f} s")
        status, payload = parent.recv()
    except EOFError:
        status, payload = "error", "the process died"
    finally:
        process.join()
    if status != "ok" and process.exitcode:
        payload += f" (exit code {process.exitcode})"
    if status != "ok":
        raise BenchError(f"{target}({kwargs}) failed:\n{payload[-3000:]}")
    return payload


def run_isolated(target: str, timeout: float = 600.0, **kwargs: Any) -> dict[str, Any]:
    """Run ``module:function(**kwargs)`` in a fresh interpreter and return its dict.

    The child (``_child.py``) adds ``peak_rss_mb`` (whole process) to the result.
    """
    argv = [sys.executable, str(HERE / "_child.py"), target, json.dumps(kwargs)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, env=child_env(), cwd=REPO, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{target} timed out after {timeout:.0f} s") from exc
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    tail = (done.stdout + done.stderr)[-3000:]
    raise BenchError(f"{target}({kwargs}) exited {done.returncode} without a result:\n{tail}")


def alternate(
    targets: Sequence[tuple[str, str]], repeats: int, *, forked: bool = False, **kwargs: Any
) -> dict[str, list[dict[str, Any]]]:
    """Run each ``(label, target)`` ``repeats`` times, interleaved (A B, B A, A B ...).

    Interleaving spreads slow drifts of a shared machine over both sides
    instead of charging them to whichever ran second; flipping the order
    each round keeps either side from always following the other.
    """
    run = run_forked if forked else run_isolated
    results: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in targets}
    for round_ in range(repeats):
        for label, target in targets if round_ % 2 == 0 else list(reversed(targets)):
            results[label].append(run(target, **kwargs))
    return results
