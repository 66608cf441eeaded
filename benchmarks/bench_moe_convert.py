"""MoE conversion: whole ``plugtron convert`` commands on a ~1B Qwen3-MoE checkpoint, per rank, against floors.

    .venv/bin/python benchmarks/bench_moe_convert.py            # ~1B, 64 experts, 3 rounds (about 4 min, 2 shared cores)
    .venv/bin/python benchmarks/bench_moe_convert.py --quick    # ~0.25B, 32 experts, 1 round (0.5-2.5 min)
    .venv/bin/python benchmarks/bench_moe_convert.py --phases   # also the 1-rank commands step by step
    .venv/bin/python benchmarks/run.py --moe-convert            # the same rows in run.py's table

**Checkpoint.** A bf16 ``Qwen3MoeForCausalLM`` checkpoint with random weights:
the config is transformers' ``Qwen3MoeConfig`` (every MoE layer, 64 experts
top-8, ``norm_topk_prob``, untied embeddings), the tensor names and shapes are
the HF layout (one tensor per expert and projection, as published Qwen3-MoE
checkpoints store them) taken from plugtron's tensor table, written layer by
layer into 512 MiB shards with safetensors directly (building the transformers
model would cost minutes and 4 GB for nothing: only the bytes matter here).
Values are copies of slices of one pool of random normals at random offsets
(drawing 1e9 normals takes a minute on 2 loaded cores).

**Commands, each timed from ``Popen`` to exit** (the whole command: Python
start, imports, checks, starting ranks, converting, writing):

* import ``plugtron convert HF --to megatron`` at 1 rank and at ``--ep 2``
  (two ranks through plugtron's launcher, on the same 2 cores), and at 1 rank
  with ``OMP_NUM_THREADS=1`` as information (the launcher sets it for its
  ranks; a 1-rank command leaves it unset, and its weight copies then use
  every core: see the README);
* export ``plugtron convert MEG --to hf --max-shard-size 512MiB`` at 1 rank
  (from the 1-rank checkpoint) and at ``--ep 2`` (from the EP=2 checkpoint).

**Floors, in the same run, alternating with the commands** (``F P P F``, reversed
every other round; previous outputs deleted and ``os.sync()`` before every run,
untimed; page cache warm for every side):

* import floor, per rank: a new Python per rank (both at once for EP=2) that
  imports ``safetensors.torch``, reads **exactly that rank's share** of the HF
  checkpoint (every dense tensor, and its own experts: ``E / ep`` per layer)
  with plain ``readinto`` into fresh tensors (the bytes land in the process's
  memory, as an import must; ``safe_open``/``load_file`` + ``clone`` was
  10-20x slower here for many mid-size tensors), and writes them with
  ``save_file`` + ``fsync`` (plugtron's torch_dist writer fsyncs its files;
  at EP=2 the dense tensors, replicated on both ranks, are written once, split
  between the two floor ranks, as the megatron checkpoint stores them once).
  The share's bytes are checked against what plugtron reports it read
  (``bytes read from the checkpoint per rank``, i.e. ``ImportedModel.reads``).
* export floor: a new Python that reads every ``.distcp`` file of the 1-rank
  megatron checkpoint with plain ``readinto`` into fresh tensors of the HF
  tensors' shapes (the same number of bytes the export reads) and writes them
  with ``save_file`` into the same 512 MiB shards the export writes (no fsync,
  as the HF writer does none).

**Peak RSS per process.** ``wait4`` only gives the largest process of a tree,
so every process of a run (the launcher, each rank, each floor process) gets a
``sitecustomize`` on ``PYTHONPATH`` (an env var this benchmark sets; plugtron's
launcher passes the environment on, and ``-P`` / ``PYTHONSAFEPATH`` do not drop
``PYTHONPATH``) that records ``VmHWM`` from ``/proc/self/status`` at exit and
samples ``VmRSS`` every 50 ms (for where the memory goes over time). The tree's
``wait4`` peak is kept as a cross-check. RSS *growth* subtracts the resident
size of a process that imported what the command imports
(``import_megatron()``, the plugin manager, a process group), measured in the
same run; for an export it also subtracts the model the rank holds (its share),
leaving what exporting itself adds.

Targets (reported, not asserted): import and export whole commands within 1.5x
of their floor (fastest run of each side); peak RSS growth of each import rank
<= 1.3x its share of the checkpoint (the process peak is printed beside it);
export peak RSS growth <= 2x the largest shard.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _measure import ensure_bytecode, free_memory_text, read_once  # noqa: E402
from _moe_checkpoint import SHAPES, export_plan, make_checkpoint, shares  # noqa: E402, F401 (make_checkpoint: --child)
from _moe_scripts import BASELINE, FLOOR_EXPORT, FLOOR_IMPORT, HOOK  # noqa: E402

MARKER = "@@BENCH-MOE@@ "
TIME_RATIO, RSS_RATIO, EXPORT_SHARDS = 1.5, 1.3, 2.0

def _plugtron() -> str:
    return str(Path(sys.executable).with_name("plugtron"))


def _env(hook: Path, rss_dir: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "BENCH_MOE_RSS_DIR": str(rss_dir), **extra}
    env["PYTHONPATH"] = str(hook) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_group(argvs: list[list[str]], env: dict[str, str], rss_dir: Path) -> dict[str, Any]:
    """Start ``argvs`` at once; wall time until the last exits, each process's peak RSS (hook), tree peaks (wait4)."""
    shutil.rmtree(rss_dir, ignore_errors=True)
    rss_dir.mkdir(parents=True)
    os.sync()
    logs = [tempfile.TemporaryFile() for _ in argvs]
    started = time.perf_counter()
    procs = [subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env) for argv, log in zip(argvs, logs)]
    tree_peaks, codes = [], []
    for proc in procs:
        _, status, usage = os.wait4(proc.pid, 0)
        codes.append(os.waitstatus_to_exitcode(status))
        tree_peaks.append(usage.ru_maxrss / 1024)
    seconds = time.perf_counter() - started
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read().decode(errors="replace"))
        log.close()
    if any(codes):
        raise RuntimeError(f"{argvs} exited {codes}:\n" + "\n".join(t[-3000:] for t in texts))
    procs_rss = [json.loads(p.read_text()) for p in rss_dir.glob("*.json")]
    return {"seconds": seconds, "tree_peak_mb": max(tree_peaks), "output": "\n".join(texts), "procs": procs_rss}


def rank_peaks(result: dict[str, Any]) -> dict[str, float]:
    """Peak RSS (MiB) per role: 'rank N' for workers, 'launcher' for a process that only started ranks."""
    procs = result["procs"]
    ranked = any(p["rank"] is not None for p in procs)
    out = {}
    for p in procs:
        role = f"rank {p['rank']}" if p["rank"] is not None else ("launcher" if ranked else "rank 0")
        out[role] = max(out.get(role, 0.0), p["hwm_kb"] / 1024)
    return dict(sorted(out.items()))


def reported_reads(output: str) -> dict[int, int]:
    """Bytes per rank from the convert report (``rank R: N (routed experts M)``)."""
    return {int(r): int(n.replace(",", "")) for r, n in re.findall(r"rank (\d+): ([\d,]+)", output)}


def work_seconds(output: str) -> float | None:
    """The seconds the command reports for its conversion itself (after imports, before exit)."""
    found = re.findall(r"(?:converted|exported) .*?, ([\d.]+) s\)", output)
    return float(found[-1]) if found else None


def floor_phases(result: dict[str, Any]) -> list[dict[str, float]]:
    return [json.loads(line.split(" ", 1)[1]) for line in result["output"].splitlines() if line.startswith("@@FLOOR@@ ")]


def _clear(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def isolated_make(directory: Path, shape: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", "make_checkpoint",
                           json.dumps({"directory": str(directory), "shape": shape})], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"})
    line = [x for x in done.stdout.splitlines() if x.startswith(MARKER)]
    if not line:
        raise RuntimeError(f"make_checkpoint failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return json.loads(line[-1][len(MARKER):])


def measure(shape: str, rounds: int, work: Path, with_phases: bool = False) -> dict[str, Any]:
    hook, rss_dir, out = work / "hook", work / "rss", work / "out"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    env = _env(hook, rss_dir)
    hf, meg = work / "hf", {1: work / "meg-ep1", 2: work / "meg-ep2"}
    started = time.perf_counter()
    info = isolated_make(hf, shape)
    info["make_s"] = time.perf_counter() - started
    shard_bytes = SHAPES[shape]["shard_mib"] * 2**20
    info["largest_shard"] = max(p.stat().st_size for p in hf.glob("*.safetensors"))
    plans = {ep: shares(hf, info["experts"], ep) for ep in (1, 2)}
    eplan = export_plan(hf, shard_bytes)

    def convert(src: Path, to: str, ep: int, dst: Path = out) -> list[list[str]]:
        argv = [_plugtron(), "convert", str(src), str(dst), "--to", to, "--no-progress"]
        if ep > 1:
            argv += ["--ep", str(ep)]
        if to == "hf":
            argv += ["--max-shard-size", f"{SHAPES[shape]['shard_mib']}MiB"]
        return [argv]

    def plan_file(name: str, plan: Any) -> str:  # too long for a command line (one name per tensor)
        (work / name).write_text(json.dumps(plan))
        return str(work / name)

    def floor_import(ep: int) -> list[list[str]]:
        # `env RANK=r` (exec, same process): the hook files its peak under that rank
        return [["env", f"RANK={p['rank']}", sys.executable, "-c", FLOOR_IMPORT, str(hf), str(out),
                 plan_file(f"share-ep{ep}-rank{p['rank']}.json", p)] for p in plans[ep]]

    floor_export = [[sys.executable, "-c", FLOOR_EXPORT, str(meg[1]), str(out),
                     plan_file("export.json", {"shards": eplan})]]
    # The megatron checkpoints the exports read (untimed; they also warm the bytecode caches).
    baseline = run_group([[sys.executable, "-c", BASELINE]], env, rss_dir)
    for ep in (1, 2):
        prep = run_group(convert(hf, "megatron", ep, meg[ep]), env, rss_dir)
        info[f"prep_ep{ep}_s"] = prep["seconds"]
        read_once(meg[ep])  # written around the page cache; floor and exports then read it alike
    runs: list[tuple[str, list[list[str]]]] = [
        ("floor import ep1", floor_import(1)), ("import ep1", convert(hf, "megatron", 1)),
        # the one-rank command leaves OMP_NUM_THREADS unset (ranks started by the launcher get 1): both are shown
        ("import ep1 omp1", [["env", "OMP_NUM_THREADS=1", *convert(hf, "megatron", 1)[0]]]),
        ("floor import ep2", floor_import(2)), ("import ep2", convert(hf, "megatron", 2)),
        ("floor export", floor_export), ("export ep1", convert(meg[1], "hf", 1)),
        ("export ep2", convert(meg[2], "hf", 2)),
    ]
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in runs}
    for index in range(rounds):
        for name, argvs in runs if index % 2 == 0 else reversed(runs):
            _clear(out)
            if name.startswith("floor import"):
                out.mkdir()
            result = run_group(argvs, env, rss_dir)
            result["load"] = os.getloadavg()[0]
            samples[name].append(result)
    _clear(out)
    steps = {}
    if with_phases:
        sys.path.insert(0, str(HERE))
        from bench_hf_command import phases  # the TP=1 command's steps in one process

        steps = {"megatron": phases("megatron", hf, out), "hf": phases("hf", meg[1], out)}
    base_mb = max(p["hwm_kb"] for p in baseline["procs"]) / 1024
    return {"shape": shape, "info": info, "plans": plans, "samples": samples, "baseline_mb": base_mb,
            "rounds": rounds, "phases": steps}


def _fastest(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return min(runs, key=lambda r: r["seconds"])


def _times(runs: list[dict[str, Any]]) -> str:
    return ", ".join(f"{r['seconds']:.2f}" for r in runs)


def _ranks(ep: int) -> str:
    return f"{ep} rank{'s' if ep > 1 else ''}"


def import_rows(result: dict[str, Any], label: str) -> list[dict[str, Any]]:
    s, plans, base = result["samples"], result["plans"], result["baseline_mb"]
    rows: list[dict[str, Any]] = []
    for key, ep in (("import ep1", 1), ("import ep1 omp1", 1), ("import ep2", 2)):
        ours, floor = s[key], s[f"floor import ep{ep}"]
        fo, ff = _fastest(ours), _fastest(floor)
        ratio = fo["seconds"] / ff["seconds"]
        phases = floor_phases(ff)
        reads = reported_reads(fo["output"])
        expected = {p["rank"]: p["bytes"] for p in plans[ep]}
        same = reads == expected
        omp = key.endswith("omp1")
        rows.append({
            "benchmark": f"MoE import `plugtron convert --to megatron{' --ep 2' if ep > 1 else ''}` {label}, "
                         f"{_ranks(ep)}{', OMP_NUM_THREADS=1' if omp else ''}, whole command, fastest of {len(ours)}",
            "plugtron": f"{fo['seconds']:.2f} s ({_times(ours)}; conversion itself {work_seconds(fo['output'])} s); "
                        "bytes read per rank " + ", ".join(f"{r}: {b:,}" for r, b in sorted(reads.items()))
                        + (" = the share" if same else f" [red]!= the share {expected}[/red]"),
            "reference": f"floor {ff['seconds']:.2f} s ({_times(floor)}): per rank python + plain reads of its share "
                         "+ save_file and fsync; read " + ", ".join(f"{p['read']:.2f}" for p in phases)
                         + " s, write " + ", ".join(f"{p['write']:.2f}" for p in phases) + " s",
            "ratio": round(ratio, 3), "target": f"<= {TIME_RATIO}x floor" if not omp else "info",
            "ok": (ratio <= TIME_RATIO and same) if not omp else None,
            "raw": {"plugtron": [r["seconds"] for r in ours], "floor": [r["seconds"] for r in floor],
                    "reads": reads, "share": expected},
        })
        if omp:
            continue
        peaks, floor_peaks = [rank_peaks(r) for r in ours], [rank_peaks(r) for r in floor]
        for p in plans[ep]:
            role = f"rank {p['rank']}"
            peak, share = max(x[role] for x in peaks), p["bytes"] / 2**20
            growth = peak - base
            launcher = f"; launcher {max(x['launcher'] for x in peaks):.0f} MiB" if "launcher" in peaks[0] else ""
            rows.append({
                "benchmark": f"MoE import peak RSS, {_ranks(ep)}, {role} (its share {share:.0f} MiB; largest of "
                             f"{len(ours)} runs): growth over the imports / share",
                "plugtron": f"growth {growth:.0f} MiB over {base:.0f} MiB of imports; process peak {peak:.0f} MiB "
                            f"= {peak / share:.2f}x share{launcher}",
                "reference": f"floor process {max(x[role] for x in floor_peaks):.0f} MiB",
                "ratio": round(growth / share, 3), "target": f"<= {RSS_RATIO}x share", "ok": growth / share <= RSS_RATIO,
            })
    return rows


def export_rows(result: dict[str, Any], label: str) -> list[dict[str, Any]]:
    info, s, plans, base = result["info"], result["samples"], result["plans"], result["baseline_mb"]
    floor = s["floor export"]
    ff = _fastest(floor)
    phases = floor_phases(ff)[0]
    shard_mb = info["largest_shard"] / 2**20
    floor_peak = max(x["rank 0"] for x in (rank_peaks(r) for r in floor))
    rows: list[dict[str, Any]] = []
    for ep in (1, 2):
        ours = s[f"export ep{ep}"]
        fo = _fastest(ours)
        ratio = fo["seconds"] / ff["seconds"]
        rows.append({
            "benchmark": f"MoE export `plugtron convert --to hf{' --ep 2' if ep > 1 else ''}` {label} from the "
                         f"EP={ep} checkpoint, {_ranks(ep)}, whole command, fastest of {len(ours)}",
            "plugtron": f"{fo['seconds']:.2f} s ({_times(ours)}; conversion itself {work_seconds(fo['output'])} s)",
            "reference": f"floor {ff['seconds']:.2f} s ({_times(floor)}): python + plain reads of the .distcp files "
                         f"({phases['read']:.2f} s) + save_file of the same HF shards ({phases['write']:.2f} s)",
            "ratio": round(ratio, 3), "target": f"<= {TIME_RATIO}x floor", "ok": ratio <= TIME_RATIO,
            "raw": {"plugtron": [r["seconds"] for r in ours], "floor": [r["seconds"] for r in floor]},
        })
        peaks = [rank_peaks(r) for r in ours]
        for p in plans[ep]:
            role = f"rank {p['rank']}"
            peak, held = max(x[role] for x in peaks), p["bytes"] / 2**20
            growth = peak - base - held
            rows.append({
                "benchmark": f"MoE export peak RSS, {_ranks(ep)}, {role}{' (writes)' if p['rank'] == 0 else ''}: growth "
                             f"beyond the imports and the model it holds / largest shard ({shard_mb:.0f} MiB); "
                             f"largest of {len(ours)} runs",
                "plugtron": f"growth {growth:.0f} MiB = process peak {peak:.0f} - imports {base:.0f} - its model "
                            f"{held:.0f} MiB",
                "reference": f"floor process {floor_peak:.0f} MiB (holds every tensor)",
                "ratio": round(growth / shard_mb, 3), "target": f"<= {EXPORT_SHARDS}x largest shard",
                "ok": growth / shard_mb <= EXPORT_SHARDS,
            })
    return rows


def phase_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [{
        "benchmark": f"where the seconds of `plugtron convert --to {to}` {result['shape']}, 1 rank, go (its steps timed "
                     "in one process as the command runs them, OMP_NUM_THREADS as the command leaves it; one run)",
        "plugtron": f"{sum(seconds.values()):.2f} s: " + ", ".join(f"{n} {x:.2f}" for n, x in seconds.items()),
        "reference": "", "ratio": "", "target": "info", "ok": None,
    } for to, seconds in result["phases"].items()]


def rows_for(result: dict[str, Any]) -> list[dict[str, Any]]:
    info = result["info"]
    label = (f"{result['shape']} ({info['params'] / 1e9:.2f}B params, {info['experts']} experts, bf16 "
             f"{info['bytes'] / 2**30:.2f} GiB, {info['shards']} shards, {info['tensors']} tensors)")
    return import_rows(result, label) + export_rows(result, label) + phase_rows(result)


def run(quick: bool, shape: str | None = None, rounds: int | None = None, phases: bool = False) -> list[dict[str, Any]]:
    """Rows {benchmark, plugtron, reference, ratio, target, ok} (run.py's ``rows_from`` contract)."""
    shape = shape or ("qwen3moe-250m" if quick else "qwen3moe-1b")
    rounds = rounds or (1 if quick else 3)  # 3: one sample in a burst of the VM's writeback must not decide a row
    ensure_bytecode()
    with tempfile.TemporaryDirectory(prefix="bench-moe-convert-") as tmp:
        result = measure(shape, rounds, Path(tmp), phases)
    rows = rows_for(result)
    info = result["info"]
    rows.append({
        "benchmark": f"MoE conversion setup {result['shape']} (untimed by the rows above)",
        "plugtron": f"checkpoint generated in {info['make_s']:.1f} s; first imports (prepare the megatron "
                    f"checkpoints) {info['prep_ep1_s']:.1f} s (1 rank), {info['prep_ep2_s']:.1f} s (EP=2)",
        "reference": f"{os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f} at the end",
        "ratio": "", "target": "info", "ok": None,
        "raw": {"info": info, "load": {k: [r["load"] for r in v] for k, v in result["samples"].items()},
                "memory": {k: [rank_peaks(r) for r in v] for k, v in result["samples"].items()},
                "tree_peak_mb": {k: [r["tree_peak_mb"] for r in v] for k, v in result["samples"].items()},
                "timeline": {k: [{p["rank"] or "0": p["samples"] for p in r["procs"]} for r in v][:1]
                             for k, v in result["samples"].items()},
                "baseline_mb": result["baseline_mb"]},
    })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~0.25B checkpoint, one round")
    parser.add_argument("--shape", choices=sorted(SHAPES))
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--phases", action="store_true",
                        help="also time the 1-rank commands step by step in one process (one run each, ~40 s more)")
    parser.add_argument("--json", type=Path, help="also write the rows (with raw samples and RSS timelines) here")
    parser.add_argument("--child", nargs=2, metavar=("FUNCTION", "KWARGS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        import warnings

        warnings.simplefilter("ignore")
        print(MARKER + json.dumps(globals()[args.child[0]](**json.loads(args.child[1]))), flush=True)
        return 0
    started, load, memory = time.perf_counter(), os.getloadavg(), free_memory_text()
    rows = run(args.quick, args.shape, args.rounds, args.phases)
    for row in rows:
        mark = {True: "ok", False: "MISS", None: "info"}[row["ok"]]
        print(f"[{mark}] {row['benchmark']}\n    plugtron: {row['plugtron']}\n    reference: {row['reference']}\n"
              f"    ratio: {row['ratio']}  target: {row['target']}", flush=True)
    print(f"{time.perf_counter() - started:.0f} s, {os.cpu_count()} CPUs, load avg {load[0]:.2f} -> "
          f"{os.getloadavg()[0]:.2f}; at the start {memory}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0 if all(row["ok"] is not False for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
