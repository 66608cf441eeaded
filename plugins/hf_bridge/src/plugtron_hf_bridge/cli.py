"""``plugtron convert``, ``plugtron verify`` and ``plugtron hf-demo``.

Parsers are built when ``plugtron`` starts, so this module imports only
argparse-level things; each ``run`` imports torch, megatron and transformers
when it runs. A command that needs more than one rank first validates what it
can in this process (config, headers, tensor table, destination), so bad input
is a one-line error with exit code 2, and only then re-launches itself under
torchrun.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable

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


def _on_ranks(args: argparse.Namespace, argv: list[str], work: Callable[[Any], int]) -> int:
    """Run ``work(parallel)`` on every rank, starting the ranks (:mod:`plugtron.runtime.launcher`) when more than one is needed."""
    from plugtron.runtime.launcher import FAILURE_TIMEOUT_S, relaunch, under_launcher

    world = args.tp * args.pp
    if world > 1 and not under_launcher():
        return relaunch(world, argv)
    from plugtron.runtime.parallel import initialize_parallel

    # plugtron.cli.main turns SIGTERM into SystemExit, so atomic writers clean up when a peer fails.
    parallel = initialize_parallel(args.tp, args.pp, args.vp, timeout_s=FAILURE_TIMEOUT_S)
    return work(parallel)


def _say(parallel: Any, text: str) -> None:
    if parallel is None or parallel.rank == 0:
        print(text, flush=True)


# -- convert ------------------------------------------------------------------------------------------
def run_convert(args: argparse.Namespace) -> int:
    _quiet()
    from plugtron.cli import manager_for

    from .exporter import parse_size, refuse_existing

    pm = manager_for(args)
    refuse_existing(args.dst, args.overwrite, sources=[args.src])
    parse_size(args.max_shard_size)
    if args.to == "megatron":
        from .importer import plan_import

        plan_import(args.src, tp=args.tp, pp=args.pp, vp=args.vp, dtype=args.dtype, pm=pm)
    else:
        from .checkpoint import read_meta

        read_meta(args.src)
    argv = _argv(args, "convert", [str(args.src), str(args.dst)], {
        "--to": args.to, "--tp": args.tp, "--pp": args.pp, "--vp": args.vp, "--dtype": args.dtype,
        "--overwrite": args.overwrite, "--max-shard-size": args.max_shard_size, "--no-progress": args.no_progress,
        "--verify": args.verify, "--json": args.json})
    work = _to_megatron if args.to == "megatron" else _to_hf
    return _on_ranks(args, argv, lambda parallel: work(args, pm, parallel))


def _to_megatron(args: argparse.Namespace, pm: Any, parallel: Any) -> int:
    from .checkpoint import bridge_meta, save_megatron
    from .importer import import_hf
    from .verify import verify

    started = time.perf_counter()
    imported = import_hf(args.src, tp=args.tp, pp=args.pp, vp=args.vp, dtype=args.dtype, pm=pm, parallel=parallel,
                         progress=not args.no_progress)
    plan = imported.plan
    if args.verify and _verify_report(args, parallel, verify(args.src, imported=imported, dtype=plan.dtype_name)):
        _say(parallel, f"not writing {args.dst}: the converted model's logits differ from transformers'")
        return 1
    save_megatron(args.dst, imported.built, plan.config, meta=bridge_meta(plan.architecture, plan.hf_config, plan.config),
                  extra_files=[plan.source / name for name in plan.tokenizer_files], overwrite=args.overwrite)
    _say(parallel, f"converted {plan.architecture} {args.src} -> megatron checkpoint {args.dst} "
                   f"(tp={args.tp} pp={args.pp}, {plan.dtype_name}, {time.perf_counter() - started:.1f} s)")
    return 0


def _to_hf(args: argparse.Namespace, pm: Any, parallel: Any) -> int:
    from .adapter import load_adapter
    from .checkpoint import load_megatron
    from .exporter import export_hf, parse_size

    started = time.perf_counter()
    loaded = load_megatron(args.src, tp=args.tp, pp=args.pp, vp=args.vp, pm=pm, parallel=parallel)
    adapter = load_adapter(loaded.meta["architecture"], pm)
    export_hf(loaded.built, loaded.config, adapter, args.dst, source_hf_config=loaded.meta.get("hf_config"),
              extra_files=loaded.tokenizer_files, dtype=args.dtype, max_shard_bytes=parse_size(args.max_shard_size),
              overwrite=args.overwrite, progress=not args.no_progress)
    _say(parallel, f"exported {loaded.meta['architecture']} {args.src} -> HF checkpoint {args.dst} "
                   f"(read at tp={args.tp} pp={args.pp}, {time.perf_counter() - started:.1f} s)")
    return 0


# -- verify -------------------------------------------------------------------------------------------
def run_verify(args: argparse.Namespace) -> int:
    _quiet()
    from plugtron.cli import manager_for

    from .importer import plan_import

    pm = manager_for(args)
    plan_import(args.src, tp=args.tp, pp=args.pp, vp=args.vp, dtype=args.dtype, pm=pm)
    argv = _argv(args, "verify", [str(args.src)], {
        "--tp": args.tp, "--pp": args.pp, "--vp": args.vp, "--dtype": args.dtype, "--tolerance": args.tolerance,
        "--batch": args.batch, "--seq": args.seq, "--json": args.json})
    return _on_ranks(args, argv, lambda parallel: _verify_on_rank(args, pm, parallel))


def _verify_on_rank(args: argparse.Namespace, pm: Any, parallel: Any) -> int:
    from .verify import verify

    report = verify(args.src, tp=args.tp, pp=args.pp, vp=args.vp, dtype=args.dtype, batch=args.batch, seq=args.seq,
                    tolerance=args.tolerance, pm=pm, parallel=parallel)
    return _verify_report(args, parallel, report)


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
