"""Writing and reading the megatron checkpoint (torch_dist) against writing and reading the same bytes.

    .venv/bin/python benchmarks/bench_hf_ckpt.py --quick     # ~250M, one process per side
    .venv/bin/python benchmarks/bench_hf_ckpt.py             # ~250M and ~1B, two processes per side

Every side runs in fresh interpreters with bench_hf's conditions (libraries
imported first and untimed, ``MALLOC_MMAP_THRESHOLD_`` fixed, ``os.sync()``
before each call; see bench_hf's docstring) and is judged on its **cold first
call**:

* write: ``checkpoint.save_megatron`` of an imported model (megatron's
  ``dist_checkpointing.save`` with plugtron's in-process torch_dist strategy,
  which ``fsync``\\s its files as megatron's own writer does) against
  ``safetensors.torch.save_file`` of the same tensors followed by ``fsync``
  (the durable floor); the plain ``save_file`` without ``fsync`` is shown too;
* read: ``checkpoint.load_megatron`` (meta build, then ``dist_checkpointing.load``
  into the parameters, at the layout it was saved at) against ``load_file`` of
  the HF shards with every tensor copied into fresh memory (bench_hf's floor).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_hf  # noqa: E402
from _measure import read_once  # noqa: E402

RATIO = 1.5


def _checkpoint_libraries() -> None:
    """What saving and loading import on their first use (megatron's and torch's checkpoint modules,
    plugtron's strategies): imported before timing, as bench_hf imports what a conversion needs."""
    import importlib

    import megatron.core.dist_checkpointing.serialization  # noqa: F401
    import torch.distributed.checkpoint.state_dict_loader  # noqa: F401
    import torch.distributed.checkpoint.state_dict_saver  # noqa: F401

    for name in ("checkpoint", "dcp_strategies", "dcp_direct", "dcp_writer"):
        try:
            importlib.import_module(f"plugtron_hf_bridge.{name}")
        except ImportError:  # an older plugtron_hf_bridge on PYTHONPATH (before/after measurements)
            pass


def _state(src: str) -> dict[str, Any]:
    """The imported model's tensors, as a plain dict of contiguous tensors (what the floor writes)."""
    from plugtron.sharding import unwrap

    imported = bench_hf._import(src)()
    return {k: v.detach().contiguous() for k, v in unwrap(imported.built.chunks[0]).state_dict().items()
            if hasattr(v, "dtype")}


def floor_save(src: str, dst: str, durable: bool = True) -> dict[str, Any]:
    from safetensors.torch import save_file

    tensors = _state(src)
    out, cleanup = bench_hf._fresh_dirs(dst)

    def write(i: int) -> None:
        out(i).mkdir()
        path = out(i) / "model.safetensors"
        save_file(tensors, str(path))
        if durable:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    return bench_hf._repeated(write, cleanup)


def plugtron_save(src: str, dst: str) -> dict[str, Any]:
    from plugtron_hf_bridge.checkpoint import bridge_meta, save_megatron

    imported = bench_hf._import(src)()
    _checkpoint_libraries()
    plan = imported.plan
    meta = bridge_meta(plan.architecture, plan.hf_config, plan.config)
    out, cleanup = bench_hf._fresh_dirs(dst)
    return bench_hf._repeated(lambda i: save_megatron(out(i), imported.built, plan.config, meta=meta), cleanup)


def plugtron_load(src: str) -> dict[str, Any]:
    from plugtron.runtime.parallel import initialize_parallel
    from plugtron_hf_bridge.checkpoint import load_megatron

    bench_hf._libraries()
    _checkpoint_libraries()
    parallel = initialize_parallel()
    return bench_hf._repeated(lambda i: load_megatron(src, parallel=parallel))


def make_megatron(src: str, dst: str) -> dict[str, Any]:
    from plugtron_hf_bridge.checkpoint import bridge_meta, save_megatron

    imported = bench_hf._import(src)()
    plan = imported.plan
    save_megatron(dst, imported.built, plan.config, meta=bridge_meta(plan.architecture, plan.hf_config, plan.config))
    return {}


def isolated(name: str, **kwargs: Any) -> dict[str, Any]:
    return bench_hf.isolated(name, script=__file__, **kwargs)


def measure_shape(shape: str, repeats: int, work: Path) -> dict[str, Any]:
    src, meg = work / shape, work / f"{shape}-megatron"
    info = bench_hf.isolated("make_checkpoint", directory=str(src), shape=shape)
    isolated("make_megatron", src=str(src), dst=str(meg))
    for directory in (src, meg):
        read_once(directory)
    sides: dict[str, list[dict[str, Any]]] = {k: [] for k in ("floor_read", "plugtron_load", "floor_durable",
                                                              "floor_write", "plugtron_save")}
    for index in range(repeats):
        order = list(sides) if index % 2 == 0 else list(reversed(sides))
        for name in order:
            dst = str(work / f"{name}-{index}")
            if name == "floor_read":
                sides[name].append(bench_hf.isolated("floor_read", src=str(src)))
            elif name == "plugtron_load":
                sides[name].append(isolated("plugtron_load", src=str(meg)))
            elif name == "plugtron_save":
                sides[name].append(isolated("plugtron_save", src=str(src), dst=dst))
            else:
                sides[name].append(isolated("floor_save", src=str(src), dst=dst, durable=name == "floor_durable"))
    return {"shape": shape, "info": info, "sides": sides, "repeats": repeats}


def rows_for(result: dict[str, Any]) -> list[dict[str, Any]]:
    s, info, n = result["sides"], result["info"], result["repeats"]
    cold = {k: float(statistics.median(x["first_seconds"] for x in v)) for k, v in s.items()}
    label = f"{result['shape']} ({info['bytes'] / 2**20:.0f} MiB bf16)"
    listed = {k: ", ".join(f"{x['first_seconds']:.2f}" for x in v) for k, v in s.items()}
    write, read = cold["plugtron_save"] / cold["floor_durable"], cold["plugtron_load"] / cold["floor_read"]
    return [{
        "benchmark": f"megatron checkpoint write {label}: save_megatron (torch_dist, fsync'd), cold first call, "
                     f"median of {n} processes",
        "plugtron": f"{cold['plugtron_save']:.2f} s ({listed['plugtron_save']} s)",
        "reference": f"floor save_file + fsync of the same bytes {cold['floor_durable']:.2f} s ({listed['floor_durable']} s);"
                     f" without fsync {cold['floor_write']:.2f} s",
        "ratio": round(write, 3), "target": f"<= {RATIO}x floor", "ok": write <= RATIO,
    }, {
        "benchmark": f"megatron checkpoint read {label}: load_megatron (build + dist_checkpointing.load), cold first "
                     f"call, median of {n} processes",
        "plugtron": f"{cold['plugtron_load']:.2f} s ({listed['plugtron_load']} s)",
        "reference": f"floor load_file + copy into fresh memory {cold['floor_read']:.2f} s ({listed['floor_read']} s)",
        "ratio": round(read, 3), "target": f"<= {RATIO}x floor", "ok": read <= RATIO,
    }]


def run(quick: bool) -> list[dict[str, Any]]:
    shapes = ["llama-250m"] if quick else ["llama-250m", "llama-1b"]
    rows: list[dict[str, Any]] = []
    for shape in shapes:
        with tempfile.TemporaryDirectory(prefix="bench-hf-ckpt-") as tmp:
            rows += rows_for(measure_shape(shape, 1 if quick else 2, Path(tmp)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~250M only, one process per side")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--child", nargs=2, metavar=("FUNCTION", "KWARGS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return bench_hf.child_main(globals(), *args.child)
    rows = run(args.quick)
    bench_hf.print_rows(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0 if all(row["ok"] is not False for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
