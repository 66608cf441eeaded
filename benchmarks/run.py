"""Run plugtron's benchmarks and print one table: plugtron vs a reference measured now.

    .venv/bin/python benchmarks/run.py            # full run (~5 min on 2 CPU cores)
    .venv/bin/python benchmarks/run.py --quick    # smaller shapes, fewer repeats (~90 s)
    .venv/bin/python benchmarks/run.py --json results.json
    .venv/bin/python benchmarks/run.py --moe-convert   # also the MoE conversion rows (7d, ~5 min more)

Every torch measurement runs in a fresh process; this process only
orchestrates (it never imports torch). See benchmarks/README.md for what each
row measures and why the targets are what they are.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_build  # noqa: E402
import bench_meta  # noqa: E402
import bench_plugins  # noqa: E402
import bench_train  # noqa: E402
from _measure import BenchError, ensure_bytecode, free_memory_text  # noqa: E402

OK, FAIL, INFO = "[green]✓[/green]", "[red]✗[/red]", "[dim]–[/dim]"


def plan(quick: bool, fresh: bool = False) -> dict[str, Any]:
    """Shapes and repeat counts of the full and the quick run."""
    return {
        "forked": not fresh,
        "plugins_repeats": 5,
        "overhead_shape": "gpt-134m",
        "overhead_repeats": 3 if quick else 5,
        "meta_shapes": ["llama3-8b", "llama3-70b"],
        "meta_repeats": 1 if quick else 2,
        "materialise_repeats": 1 if quick else 3,
        "eager_shape": "llama-140m" if quick else "llama-1.1b",
        "eager_repeats": 3,
        "train_shape": "gpt-tiny",
        "train_repeats": 1 if quick else 3,
        "train_batch": 2,
        "train_warmup": 2,
        "train_steps": 12,
    }


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "n/a"


def _procs(p: dict[str, Any]) -> str:
    return "a new forked process each" if p["forked"] else "a new interpreter each"


def _samples(values: list[float], unit: str = "s") -> str:
    return "[dim](" + ", ".join(f"{v:.2f}" for v in values) + f" {unit})[/dim]"


def row_plugins(p: dict[str, Any]) -> tuple[list[list[str]], dict[str, Any]]:
    r = bench_plugins.measure(p["plugins_repeats"])
    heavy = r["heavy_imported"]
    ok = r["plugtron_s"] < 1.0 and not heavy
    imported = "imports " + ", ".join(heavy) if heavy else "torch not imported"
    return [[
        f"1. `plugtron plugins` wall time (median of {p['plugins_repeats']})",
        f"{r['plugtron_s']:.3f} s, {imported}",
        f"{r['python_s']:.3f} s (`python -c pass`)",
        f"{r['plugtron_s'] / r['python_s']:.1f}x",
        "< 1 s, no torch",
        OK if ok else FAIL,
    ]], r


def _build_comparison(p: dict[str, Any], key: str) -> tuple[dict[str, Any], float, float, str]:
    """Rows 2 and 4: (result, wall-time ratio, in-process ratio, param-count warning) of one eager build comparison."""
    r = bench_build.compare(p[f"{key}_shape"], p[f"{key}_repeats"], forked=p["forked"])
    same = "" if r["same_params"] else " [red]param counts differ[/red]"
    return r, r["plugtron_s"] / r["direct_s"], r["inprocess_ratio"], same


def row_overhead(p: dict[str, Any]) -> tuple[list[list[str]], dict[str, Any]]:
    r, ratio, inproc, same = _build_comparison(p, "overhead")
    rows = [
        [
            f"2. build {r['shape']} ({_params(r['params'])}): pipeline vs GPTModel() direct, "
            f"{_procs(p)}, median of {p['overhead_repeats']}{same}",
            f"{r['plugtron_s']:.2f} s {_samples(r['plugtron_samples'])}",
            f"{r['direct_s']:.2f} s {_samples(r['direct_samples'])}",
            f"{ratio:.3f}",
            "<= 1.03",
            OK if ratio <= 1.03 and r["same_params"] else FAIL,
        ],
        [
            "2b. same plugtron builds, split in-process: build_model() total / its GPTModel() call",
            f"{r['pipeline_overhead_s'] * 1e3:.0f} ms outside GPTModel() (median)",
            f"{r['plugtron_construct_s']:.2f} s in GPTModel() (same processes)",
            f"{inproc:.3f}",
            "<= 1.03",
            OK if inproc <= 1.03 else FAIL,
        ],
    ]
    return rows, r


def row_meta(p: dict[str, Any]) -> tuple[list[list[str]], dict[str, Any]]:
    rows, raw = [], {}
    for shape in p["meta_shapes"]:
        r = bench_meta.compare(shape, p["meta_repeats"])
        raw[shape] = r
        ok = r["plugtron_s"] < 2.0 and r["plugtron_rss_mb"] < 500 and r["same_params"] and r["all_meta"]
        note = "" if r["same_params"] and r["all_meta"] else " [red]param mismatch or non-meta tensors[/red]"
        rows.append([
            f"3. meta-device construction {shape} ({_params(r['params'])}), no materialisation, "
            f"median of {p['meta_repeats']}{note}",
            f"{r['plugtron_s']:.2f} s, peak RSS {r['plugtron_rss_mb']:.0f} MB",
            f"{r['direct_s']:.2f} s, peak RSS {r['direct_rss_mb']:.0f} MB (GPTModel() under torch.device('meta'))",
            _ratio(r["plugtron_s"], r["direct_s"]),
            "< 2 s, < 500 MB",
            OK if ok else FAIL,
        ])
    return rows, raw


def row_materialise(p: dict[str, Any], overhead: dict[str, Any]) -> tuple[list[list[str]], dict[str, Any]]:
    if not p["materialise_repeats"]:
        return [], {}
    r = bench_build.meta_materialised(p["overhead_shape"], p["materialise_repeats"], forked=p["forked"])
    note = "" if r["materialised"] else " [red]meta tensors left[/red]"
    return [[
        f"3b. BuildOptions(meta_device=True) build + materialise {r['shape']}, median of "
        f"{p['materialise_repeats']}{note}",
        f"{r['seconds']:.2f} s {_samples(r['samples'])}",
        f"{overhead['plugtron_s']:.2f} s (eager plugtron build, row 2)",
        _ratio(r["seconds"], overhead["plugtron_s"]),
        "info",
        INFO if r["materialised"] else FAIL,
    ]], r


def row_eager(p: dict[str, Any]) -> tuple[list[list[str]], dict[str, Any]]:
    r, ratio, inproc, same = _build_comparison(p, "eager")
    return [
        [
            f"4. eager CPU build {r['shape']} ({_params(r['params'])}): plugtron vs GPTModel() direct, "
            f"{_procs(p)}, median of {p['eager_repeats']}{same}",
            f"{r['plugtron_s']:.2f} s {_samples(r['plugtron_samples'])}",
            f"{r['direct_s']:.2f} s {_samples(r['direct_samples'])}",
            f"{ratio:.3f}",
            "<= 1.03",
            OK if ratio <= 1.03 and r["same_params"] else FAIL,
        ],
        [
            "4b. same plugtron builds, split in-process: build_model() total / its GPTModel() call",
            f"{r['pipeline_overhead_s'] * 1e3:.0f} ms outside GPTModel() (median)",
            f"{r['plugtron_construct_s']:.2f} s in GPTModel() (same processes)",
            f"{inproc:.3f}",
            "<= 1.03",
            OK if inproc <= 1.03 else FAIL,
        ],
    ], r


def row_train(p: dict[str, Any]) -> tuple[list[list[str]], dict[str, Any]]:
    r = bench_train.compare(p["train_shape"], p["train_repeats"], p["train_batch"], p["train_warmup"], p["train_steps"], forked=p["forked"])
    ratio = r["ratio"]
    same = "" if r["same_params"] else " [red]param counts differ[/red]"
    return [[
        f"5. fwd+bwd tokens/s {r['shape']} ({_params(r['params'])}), {p['train_batch']}x{r['seq_length']} tokens/step; "
        f"both models in one process, steps alternating, fastest of {p['train_steps']} each; "
        f"{p['train_repeats']} processes; ratio = median of per-process ratios{same}",
        f"{r['plugtron_tps']:.0f} tok/s {_samples(r['plugtron_samples'], 'tok/s')}",
        f"{r['direct_tps']:.0f} tok/s {_samples(r['direct_samples'], 'tok/s')}",
        f"{ratio:.3f}",
        ">= 0.95",
        OK if ratio >= 0.95 and r["same_params"] else FAIL,
    ]], r


def rows_from(module_name: str, quick: bool, **options: Any) -> tuple[list[list[str]], dict[str, Any]]:
    """Rows of a family benchmark module whose ``run(quick, **options)`` returns dict rows (bench_mamba, bench_hf...)."""
    import importlib

    try:
        module = importlib.import_module(module_name)
        results = module.run(quick, **options)
    except Exception as exc:  # noqa: BLE001 - a broken benchmark is a failed row, not a lost run
        raise BenchError(f"{module_name}: {type(exc).__name__}: {exc}") from exc
    mark = {True: OK, False: FAIL, None: INFO}
    rows = [[r["benchmark"], str(r["plugtron"]), str(r["reference"]), str(r["ratio"]), str(r["target"]), mark[r["ok"]]]
            for r in results]
    return rows, {"rows": [{k: v for k, v in r.items() if k != "raw"} for r in results]}


def _guard(name: str, function: Callable[[], tuple[list[list[str]], dict[str, Any]]]) -> tuple[list[list[str]], Any]:
    """A failing benchmark becomes a ✗ row with its error, not a lost run."""
    try:
        return function()
    except BenchError as exc:
        message = str(exc).strip().splitlines()
        return [[name, "[red]failed[/red]", "", "", "", FAIL]], {"error": "\n".join(message[-20:])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~150M instead of ~1B eager build, fewer repeats")
    parser.add_argument("--json", type=Path, help="also write the raw measurements here")
    parser.add_argument("--hf-large", action="store_true",
                        help="also time the whole `plugtron convert` commands on the ~1B checkpoint (about 4 min more)")
    parser.add_argument("--moe-convert", action="store_true",
                        help="also the MoE conversion commands on a ~1B Qwen3-MoE checkpoint, 1 rank and EP=2, per-rank "
                             "bytes read and peak RSS against their floors (about 5 min more; ~0.25B with --quick)")
    parser.add_argument(
        "--fresh", action="store_true",
        help="start a new interpreter for every measurement instead of forking from a preloaded server (slower)",
    )
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # piped or redirected: don't squeeze the table into 80 columns
        console = Console(width=170)
    p = plan(args.quick, args.fresh)
    ensure_bytecode()
    started = time.perf_counter()
    load_before, memory_before = os.getloadavg(), free_memory_text()
    rows: list[list[str]] = []
    raw: dict[str, Any] = {"plan": p}
    steps: list[tuple[str, Callable[[], tuple[list[list[str]], Any]]]] = [
        ("1. plugins", lambda: row_plugins(p)),
        ("2. overhead", lambda: row_overhead(p)),
        ("3. meta", lambda: row_meta(p)),
        ("3b. materialise", lambda: row_materialise(p, raw.get("2. overhead", {}))
         if "plugtron_s" in raw.get("2. overhead", {}) else ([], {})),
        ("4. eager", lambda: row_eager(p)),
        ("5. train", lambda: row_train(p)),
        ("6. mamba mixer", lambda: rows_from("bench_mamba", args.quick)),
        ("7. hf conversion", lambda: rows_from("bench_hf", args.quick)),
        ("7b. hf commands", lambda: rows_from("bench_hf_command", args.quick, large=args.hf_large)),
        ("7c. megatron checkpoint", lambda: rows_from("bench_hf_ckpt", args.quick)),
    ]
    if args.moe_convert:
        steps.append(("7d. moe conversion", lambda: rows_from("bench_moe_convert", args.quick)))
    for name, function in steps:
        with console.status(f"running {name} ..."):
            step_started = time.perf_counter()
            new_rows, result = _guard(name, function)
        console.log(f"{name}: {time.perf_counter() - step_started:.1f} s")
        rows.extend(new_rows)
        raw[name] = result

    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()
    title = (
        f"plugtron benchmarks{' (--quick)' if args.quick else ''} — {datetime.date.today()}, "
        f"{os.cpu_count()} CPU cores, {platform.python_version()}, {elapsed:.0f} s, "
        f"load avg {load_before[0]:.1f} -> {load_after[0]:.1f}, {memory_before} at the start"
    )
    busy = max(load_before[0], load_after[0]) > (os.cpu_count() or 1)
    caption = (
        "[yellow]the machine was busy with other work (1-min load average above the core count): "
        "cross-process ratios (rows 2, 4) and throughput (row 5) are noisy; rows 2b/4b are the robust overhead measure[/yellow]"
        if busy else None
    )
    table = Table(title=title, caption=caption, show_lines=True)
    for column in ("benchmark", "plugtron", "reference", "ratio", "target", "ok"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for name, result in raw.items():
        if isinstance(result, dict) and "error" in result:
            console.print(f"[red]{name} failed:[/red]\n{result['error']}")
    if args.json:
        raw["elapsed_s"] = elapsed
        raw["loadavg"] = [load_before, load_after]
        args.json.write_text(json.dumps(raw, indent=2))
    return 0 if all(FAIL not in row[-1] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
