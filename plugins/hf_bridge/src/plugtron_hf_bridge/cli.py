"""``plugtron convert``, ``plugtron verify`` and ``plugtron hf-demo``.

Parsers are built when ``plugtron`` starts, so this module imports only
argparse-level things; each ``run`` imports what it needs when it runs:
``convert`` imports torch and megatron-core (:func:`.libraries.import_megatron`)
but never transformers unless ``--verify``; ``verify`` needs transformers.

A command that needs more than one rank first validates what it can in this
process (config, headers, tensor table, destination: :mod:`.preflight`, which
imports none of torch, megatron or transformers), so bad input is a one-line
error with exit code 2, and only then starts its ranks with plugtron's
launcher. Each rank (and a one-rank command) plans once and passes the plan on.

Under an external launcher (torchrun on one or several nodes, srun:
:func:`plugtron.runtime.launcher.launched` decides) a command starts no ranks:
each rank checks that the launcher's world is exactly the layout's (else one
line naming the flags and the world size, on every rank, before any
rendezvous), plans, and reads only its own bytes; global rank 0 writes.

``--ep`` / ``--etp`` set a MoE model's expert layout. The world size is
megatron's (:func:`plugtron.runtime.parallel.world_size_for`, as ``plugtron
build`` sizes it): experts reuse data- and tensor-parallel ranks, so ``--tp 2
--ep 2`` runs on two ranks and ``--ep 2`` alone on two.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from plugtron.cli import positive_int

DTYPE_CHOICES = ("float32", "bfloat16", "float16")


def add_parsers(commands: Any) -> None:
    _convert_parser(commands)
    _verify_parser(commands)
    demo = commands.add_parser("hf-demo", help="tiny random Llama: HF -> megatron (TP=2) -> verify -> HF, bit-exact")
    demo.add_argument("--workdir", type=Path, default=None, help="where to write the checkpoints (default: a temp dir)")
    demo.add_argument("--config", type=Path, default=None, help="HF config.json to use (default: examples/hf/tiny-llama)")
    demo.set_defaults(run=run_demo)


def _layout_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=positive_int, default=1, help="pipeline-parallel size")
    parser.add_argument("--vp", type=positive_int, default=None, help="virtual pipeline stages per pipeline rank")
    parser.add_argument("--ep", type=positive_int, default=1, help="expert model-parallel size (MoE models)")
    parser.add_argument("--etp", type=positive_int, default=None,
                        help="expert tensor-parallel size (MoE models; default: --tp)")


def _convert_parser(commands: Any) -> None:
    parser = commands.add_parser("convert", help="convert HF safetensors <-> megatron distributed checkpoints")
    parser.add_argument("src", type=Path, help="HF checkpoint directory (--to megatron) or megatron checkpoint (--to hf)")
    parser.add_argument("dst", type=Path, help="output directory (refused if it exists, unless --overwrite)")
    parser.add_argument("--to", required=True, choices=("megatron", "hf"), help="output format")
    _layout_args(parser)
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="parameter dtype (default: as stored)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing destination (atomically)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard for --to hf (default 5GB)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--verify", action="store_true",
                        help="--to megatron: compare logits with transformers first; nothing is written if they differ")
    parser.add_argument("--json", action="store_true", help="with --verify: print the parity report as one JSON line")
    parser.set_defaults(run=run_convert)


def _verify_parser(commands: Any) -> None:
    parser = commands.add_parser("verify", help="compare logits of an HF checkpoint in transformers and in plugtron")
    parser.add_argument("src", type=Path, help="HF checkpoint directory")
    _layout_args(parser)
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32", help="dtype of both models (default float32)")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="max abs logits difference allowed (default: twice transformers' own difference from a "
                             "run one precision higher, float64 for float32, and at least 1e-4)")
    parser.add_argument("--batch", type=positive_int, default=2)
    parser.add_argument("--seq", type=positive_int, default=None, help="tokens per sample (default min(seq_length, 32))")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON line")
    parser.set_defaults(run=run_verify)


# -- shared plumbing ----------------------------------------------------------------------------------
def _argv(args: argparse.Namespace, command: str, positional: list[str], flags: dict[str, Any]) -> list[str]:
    """The command line to re-run under torchrun (the parsed values, not sys.argv: callers may be in-process)."""
    out = [item for plugin in args.plugin for item in ("-p", plugin)] + [command, *positional]
    for flag, value in flags.items():
        if value is True:
            out.append(flag)
        elif value not in (None, False):
            out += [flag, str(value)]
    return out


def _quiet() -> None:
    import warnings

    warnings.filterwarnings("ignore", module=r"megatron\.")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def _world(args: argparse.Namespace) -> int:
    """Ranks the layout needs: megatron's smallest world for tp x pp and the expert layout."""
    from plugtron.runtime.parallel import world_size_for

    return world_size_for(args.tp, args.pp, ep=args.ep, etp=args.etp)


def _layout_flags(args: argparse.Namespace) -> str:
    """The layout flags as given (``--tp 4``, ``--tp 2 --ep 2``), for messages."""
    flags = [f"--{name} {getattr(args, name)}" for name in ("tp", "pp", "vp", "ep", "etp")
             if getattr(args, name) not in (None, 1)]
    return " ".join(flags) or "--tp 1 --pp 1"


def _check_world(args: argparse.Namespace) -> None:
    """Under an external launcher: its world must be the layout's, checked before anything heavy runs."""
    from plugtron.runtime.launcher import check_world

    check_world(_world(args), _layout_flags(args))


def _launches(args: argparse.Namespace) -> bool:
    """True in the process that must start the ranks (more than one rank, not already one of them)."""
    from plugtron.runtime.launcher import under_launcher

    return _world(args) > 1 and not under_launcher()


def _relaunch(args: argparse.Namespace, argv: list[str]) -> int:
    from plugtron.runtime.launcher import relaunch

    return relaunch(_world(args), argv)


def _expert_flags(args: argparse.Namespace) -> dict[str, Any]:
    return {"--ep": args.ep if args.ep != 1 else None, "--etp": args.etp}


def _parallel(args: argparse.Namespace) -> Any:
    """This rank's process groups (:func:`plugtron.runtime.parallel.initialize_parallel`)."""
    from plugtron.runtime.launcher import FAILURE_TIMEOUT_S
    from plugtron.runtime.parallel import initialize_parallel

    # plugtron.cli.main turns SIGTERM into SystemExit, so atomic writers clean up when a peer fails.
    return initialize_parallel(args.tp, args.pp, args.vp, ep=args.ep, etp=args.etp, timeout_s=FAILURE_TIMEOUT_S)


def _settle() -> None:
    """Before a command process exits: the objects made since the imports need no collection either."""
    from .libraries import settle

    settle()


def _check_hf(args: argparse.Namespace, pm: Any) -> Any:
    """In a launcher: the torch-free checks (or the full plan for third-party adapters). Else: the plan."""
    from .importer import plan_import
    from .preflight import preflight_import

    if _launches(args):
        if not preflight_import(args.src, dtype=args.dtype, pm=pm, ep=args.ep, etp=args.etp):
            plan_import(args.src, tp=args.tp, pp=args.pp, vp=args.vp, dtype=args.dtype, pm=pm, ep=args.ep, etp=args.etp)
        return None
    from .libraries import import_megatron, settle

    import_megatron()
    settle()
    return plan_import(args.src, tp=args.tp, pp=args.pp, vp=args.vp, dtype=args.dtype, pm=pm, ep=args.ep,
                       etp=args.etp)


def _say(parallel: Any, text: str) -> None:
    if parallel is None or parallel.rank == 0:
        print(text, flush=True)


# -- convert ------------------------------------------------------------------------------------------
def run_convert(args: argparse.Namespace) -> int:
    _quiet()
    from plugtron.cli import manager_for

    from .exporter import parse_size, refuse_existing

    _check_world(args)
    pm = manager_for(args)
    refuse_existing(args.dst, args.overwrite, sources=[args.src])
    parse_size(args.max_shard_size)
    if args.to == "megatron":
        prepared = _check_hf(args, pm)
    else:
        prepared = _check_megatron(args)
    if _launches(args):
        return _relaunch(args, _argv(args, "convert", [str(args.src), str(args.dst)], {
            "--to": args.to, "--tp": args.tp, "--pp": args.pp, "--vp": args.vp, "--dtype": args.dtype,
            "--overwrite": args.overwrite, "--max-shard-size": args.max_shard_size, "--no-progress": args.no_progress,
            "--verify": args.verify, "--json": args.json, **_expert_flags(args)}))
    work = _to_megatron if args.to == "megatron" else _to_hf
    code = work(args, pm, _parallel(args), prepared)
    _settle()
    return code


def _check_megatron(args: argparse.Namespace) -> Any:
    """Every file of the megatron checkpoint: inertly in a launcher (no torch), else for real (its bridge metadata)."""
    from .checkpoint import read_meta

    if _launches(args):
        return read_meta(args.src, inert=True)
    from .libraries import import_megatron, settle

    import_megatron()
    settle()
    return read_meta(args.src)


def _to_megatron(args: argparse.Namespace, pm: Any, parallel: Any, plan: Any) -> int:
    from .checkpoint import bridge_meta, save_megatron
    from .importer import import_hf

    started = time.perf_counter()
    imported = import_hf(args.src, tp=args.tp, pp=args.pp, vp=args.vp, dtype=args.dtype, pm=pm, parallel=parallel,
                         progress=not args.no_progress, plan=plan, ep=args.ep, etp=args.etp)
    plan = imported.plan
    if args.verify:
        from .verify import verify

        if _verify_report(args, parallel, verify(args.src, imported=imported, dtype=plan.dtype_name)):
            _say(parallel, f"not writing {args.dst}: the converted model's logits differ from transformers'")
            return 1
    save_megatron(args.dst, imported.built, plan.config, meta=bridge_meta(plan.architecture, plan.hf_config, plan.config),
                  extra_files=[plan.source / name for name in plan.tokenizer_files], overwrite=args.overwrite)
    from .verify import layout_text

    _say(parallel, f"converted {plan.architecture} {args.src} -> megatron checkpoint {args.dst} "
                   f"({layout_text(parallel, plan.config)}, {plan.dtype_name}, {time.perf_counter() - started:.1f} s)")
    _say(parallel, reads_text(imported.reads))
    return 0


def reads_text(reads: list[dict[str, int]]) -> str:
    """One line per rank: checkpoint bytes it read (routed experts apart): each reads only its own share."""
    lines = ["bytes read from the checkpoint per rank:"]
    for r in reads:
        experts = f" (routed experts {r['expert_bytes']:,})" if r["expert_bytes"] else ""
        lines.append(f"  rank {r['rank']}: {r['bytes']:,}{experts}")
    return "\n".join(lines)


def _to_hf(args: argparse.Namespace, pm: Any, parallel: Any, meta: Any) -> int:
    from .adapter import load_adapter
    from .checkpoint import load_megatron
    from .exporter import export_hf, parse_size

    started = time.perf_counter()
    loaded = load_megatron(args.src, tp=args.tp, pp=args.pp, vp=args.vp, pm=pm, parallel=parallel, meta=meta,
                           ep=args.ep, etp=args.etp)
    adapter = load_adapter(loaded.meta["architecture"], pm)
    export_hf(loaded.built, loaded.config, adapter, args.dst, source_hf_config=loaded.meta.get("hf_config"),
              extra_files=loaded.tokenizer_files, dtype=args.dtype, max_shard_bytes=parse_size(args.max_shard_size),
              overwrite=args.overwrite, progress=not args.no_progress)
    from .verify import layout_text

    _say(parallel, f"exported {loaded.meta['architecture']} {args.src} -> HF checkpoint {args.dst} "
                   f"(read at {layout_text(parallel, loaded.config)}, {time.perf_counter() - started:.1f} s)")
    return 0


# -- verify -------------------------------------------------------------------------------------------
def run_verify(args: argparse.Namespace) -> int:
    _quiet()
    from plugtron.cli import manager_for

    _check_world(args)
    pm = manager_for(args)
    plan = _check_hf(args, pm)
    if _launches(args):
        return _relaunch(args, _argv(args, "verify", [str(args.src)], {
            "--tp": args.tp, "--pp": args.pp, "--vp": args.vp, "--dtype": args.dtype, "--tolerance": args.tolerance,
            "--batch": args.batch, "--seq": args.seq, "--json": args.json, **_expert_flags(args)}))
    from .importer import import_hf
    from .verify import verify

    parallel = _parallel(args)
    imported = import_hf(args.src, pm=pm, parallel=parallel, plan=plan)
    report = verify(args.src, dtype=args.dtype, batch=args.batch, seq=args.seq, tolerance=args.tolerance,
                    imported=imported)
    code = _verify_report(args, parallel, report)
    _settle()
    return code


def _verify_report(args: argparse.Namespace, parallel: Any, report: Any) -> int:
    """Print the parity numbers on rank 0; exit code 1 when over tolerance."""
    import json

    import attrs

    if getattr(args, "json", False):
        _say(parallel, json.dumps({**attrs.asdict(report), "ok": report.ok}))
    else:
        verdict = "OK" if report.ok else "FAILED"
        _say(parallel, f"verify {args.src} ({report.layout}, {report.dtype}, {report.tokens} tokens): "
                       f"max abs logits diff {report.max_abs_diff:.3g} (tolerance {report.tolerance:g}, "
                       + (f"transformers' own {report.dtype} diff {report.reference_noise:.3g}, "
                          if report.reference_noise is not None else "")
                       + f"logit scale {report.logit_scale:.3g}), cosine {report.cosine:.8f}, "
                       f"top-1 agreement {report.top1_agreement:.2%} -> {verdict}")
    return 0 if report.ok else 1


# -- demo ---------------------------------------------------------------------------------------------
def run_demo(args: argparse.Namespace) -> int:
    _quiet()
    from .demo import run

    return run(args.workdir, config=args.config, plugins=args.plugin)
