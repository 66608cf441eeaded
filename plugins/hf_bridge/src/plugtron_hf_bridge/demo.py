"""``plugtron hf-demo``: the whole bridge on a tiny random Llama, end to end, on a CPU.

1. build a random ``LlamaForCausalLM`` from ``examples/hf/tiny-llama/config.json``
   (nothing is downloaded) and save it as safetensors;
2. ``plugtron convert --to megatron --tp 2 --verify``: two ranks read their
   shards, compare logits with transformers, write a distributed checkpoint;
3. ``plugtron convert --to hf`` at TP=1: the TP=2 checkpoint loads at another
   layout and is exported back to safetensors;
4. compare every tensor of the round trip bit for bit, and the configs.

Each step is the real command line in a fresh process, as a user would run
it; the report shows the commands and the numbers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from plugtron.errors import PlugtronError

EXAMPLE = Path("examples") / "hf" / "tiny-llama" / "config.json"


def find_config(explicit: Path | None) -> Path:
    """The given config, else the example shipped in the repository (from the cwd or this checkout)."""
    candidates = [explicit] if explicit else [Path.cwd() / EXAMPLE, Path(__file__).resolve().parents[4] / EXAMPLE]
    for path in candidates:
        if path is not None and path.is_file():
            return path
    raise PlugtronError(f"hf-demo: no config found at {', '.join(map(str, candidates))}; pass --config")


def make_checkpoint(config_path: Path, out: Path, seed: int = 0) -> dict[str, Any]:
    """A randomly initialised HF model saved as safetensors (std 0.1 weights: non-trivial logits)."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    data = json.loads(config_path.read_text())
    config = transformers.AutoConfig.for_model(**data)
    torch.manual_seed(seed)
    model = getattr(transformers, data["architectures"][0])(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.1)
    model.save_pretrained(out)
    return {"params": sum(p.numel() for p in model.parameters())}


def _plugtron(argv: Sequence[str], plugins: Sequence[str]) -> tuple[int, str, float]:
    from plugtron.runtime.launcher import python_command, safe_env

    command = python_command("plugtron.cli", [*[x for p in plugins for x in ("-p", p)], *argv])
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=safe_env(PYTHONWARNINGS="ignore"))
    return done.returncode, done.stdout + done.stderr, time.perf_counter() - started


def compare_dirs(original: Path, exported: Path) -> dict[str, Any]:
    """Names, dtypes and bytes of every tensor; config.json keys that differ."""
    import torch

    from .safetensors_io import SafetensorsCheckpoint

    with SafetensorsCheckpoint(original) as a, SafetensorsCheckpoint(exported) as b:
        names_equal = a.names() == b.names()
        different = [n for n in a.names() if n in b and not (a.dtype(n) == b.dtype(n) and torch.equal(a.read(n), b.read(n)))]
        count = len(a.names())
    left, right = (json.loads((d / "config.json").read_text()) for d in (original, exported))
    config_diff = sorted(k for k in set(left) | set(right) if k != "transformers_version" and left.get(k) != right.get(k))
    return {"tensors": count, "names_equal": names_equal, "different": different, "config_diff": config_diff,
            "shards": len(list(exported.glob("*.safetensors")))}


#: Written into a --workdir the demo created, so a later demo may replace what is inside.
MARKER = ".plugtron-hf-demo"
OUTPUTS = ("hf", "megatron-tp2", "hf-roundtrip")


def claim_workdir(workdir: Path) -> None:
    """Use ``workdir`` only if it is new, empty, or made by an earlier demo: never delete a user's files.

    A demo-made folder holds :data:`MARKER`; then only the demo's own outputs
    (:data:`OUTPUTS`) are replaced, anything else in it is left alone.
    """
    if workdir.is_symlink() or (workdir.exists() and not workdir.is_dir()):
        raise PlugtronError(f"hf-demo: --workdir {workdir} is not a directory")
    if workdir.is_dir() and any(workdir.iterdir()) and not (workdir / MARKER).is_file():
        raise PlugtronError(f"hf-demo: --workdir {workdir} already holds files the demo did not make; "
                            "give an empty or new directory")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("made by plugtron hf-demo; its outputs here are replaced by the next demo\n")
    for name in OUTPUTS:
        out = workdir / name
        if out.is_symlink() or out.is_file():
            out.unlink()
        elif out.is_dir():
            shutil.rmtree(out)


def run(workdir: Path | None, *, config: Path | None = None, plugins: Sequence[str] = ()) -> int:
    config_path = find_config(config)
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="plugtron-hf-demo-") as tmp:
            return _run(Path(tmp), config_path, plugins)
    claim_workdir(workdir)
    return _run(workdir, config_path, plugins)


def _run(work: Path, config_path: Path, plugins: Sequence[str]) -> int:
    hf, meg, back = (work / name for name in OUTPUTS)
    rows: list[tuple[str, str, str]] = []
    made = make_checkpoint(config_path, hf)
    shown = config_path.resolve().relative_to(Path.cwd()) if config_path.resolve().is_relative_to(Path.cwd()) else config_path
    rows.append(("random HF checkpoint", f"{made['params']:,} params from {shown}", "✓"))
    code, out, seconds = _plugtron(["convert", str(hf), str(meg), "--to", "megatron", "--tp", "2", "--verify",
                                    "--json", "--no-progress"], plugins)
    report = _json_line(out)
    parity = (f"max |Δlogits| {report['max_abs_diff']:.2e} (≤ {report['tolerance']:g}), cosine {report['cosine']:.6f}, "
              f"top-1 {report['top1_agreement']:.0%}" if report else "no report")
    rows.append(("HF -> megatron, TP=2, parity vs transformers", f"{parity}; {seconds:.1f} s", _mark(code == 0)))
    if code == 0:
        code, out, seconds = _plugtron(["convert", str(meg), str(back), "--to", "hf", "--max-shard-size", "200KB",
                                        "--no-progress"], plugins)
        rows.append(("megatron (saved at TP=2) -> HF, loaded at TP=1", f"{seconds:.1f} s", _mark(code == 0)))
    exact = None
    if code == 0:
        exact = compare_dirs(hf, back)
        ok = exact["names_equal"] and not exact["different"] and not exact["config_diff"]
        detail = (f"{exact['tensors']} tensors bit-exact in {exact['shards']} shards, config.json equal" if ok else
                  f"differ: {exact['different'][:5]} config keys {exact['config_diff'][:5]}")
        rows.append(("round trip HF -> megatron -> HF", detail, _mark(ok)))
        code = 0 if ok else 1
    _print(rows, work, out if code else "")
    return code


def _json_line(output: str) -> dict[str, Any] | None:
    for line in reversed(output.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def _mark(ok: bool) -> str:
    return "[green]✓[/green]" if ok else "[red]✗[/red]"


def _print(rows: list[tuple[str, str, str]], work: Path, failure_output: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"plugtron hf-demo ({work})")
    for column in ("step", "result", "ok"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    console = Console(width=max(100, Console().width))
    console.print(table)
    if failure_output:
        console.print(f"[red]last command failed:[/red]\n{failure_output[-4000:]}")
