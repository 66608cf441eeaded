"""``plugtron build CONFIG``: any family's config through the shared pipeline."""

from __future__ import annotations

import argparse
from typing import Any

import warnings

from plugtron.runtime.launcher import FAILURE_TIMEOUT_S, check_world, relaunch, under_launcher


def add_parser(commands: Any) -> None:
    from plugtron.cli import positive_int

    parser = commands.add_parser("build", help="build a model config through the shared pipeline")
    parser.add_argument("config", help="model config file (JSON or YAML)")
    parser.add_argument("--tp", type=positive_int, default=None, help="tensor-parallel size (default: the config's)")
    parser.add_argument("--pp", type=positive_int, default=None, help="pipeline-parallel size")
    parser.add_argument("--vp", type=positive_int, default=None, help="virtual pipeline stages per pipeline rank")
    parser.add_argument("--ep", type=positive_int, default=None, help="expert model-parallel size (MoE; default: the config's)")
    parser.add_argument("--etp", type=positive_int, default=None, help="expert tensor-parallel size (MoE; default: the config's, else --tp)")
    parser.add_argument(
        "--dp", type=positive_int, default=None,
        help="data-parallel size (default: 1, or what expert parallelism needs: experts reuse data-parallel ranks)",
    )
    parser.add_argument("--meta", action="store_true", help="construct on the meta device, then materialise")
    parser.add_argument("--wrap", default="none", choices=("none", "ddp", "fsdp2", "megatron_fsdp"))
    parser.add_argument("--step", action="store_true", help="run one forward/backward step on random tokens")
    parser.add_argument("--batch-size", type=positive_int, default=2)
    parser.add_argument("--seq-length", type=positive_int, default=None, help="tokens per sample for --step (default: min(seq_length, 64))")
    for when in ("pre", "post"):
        parser.add_argument(
            f"--{when}-wrap-hook", action="append", default=[], metavar="MODULE:FUNCTION",
            help=f"also run hook(chunks, config, context) {'before' if when == 'pre' else 'after'} wrapping, after the "
                 "plugins' hooks (repeatable; your own code, importable like a -p module, i.e. installed or on PYTHONPATH)",
        )
    parser.set_defaults(run=run)


def _hooks(paths: list[str], flag: str) -> list[Any]:
    """The functions named on the command line (the user's own code, trusted like ``-p``)."""
    from plugtron.errors import PluginError
    from plugtron.records import resolve

    hooks = []
    for path in paths:
        try:
            hook = resolve(path)
        except Exception as exc:  # noqa: BLE001 - name the flag and path whatever went wrong
            raise PluginError(f"{flag} {path}: cannot load it: {type(exc).__name__}: {exc}") from exc
        if not callable(hook):
            raise PluginError(f"{flag} {path}: is not a function hook(chunks, config, context)")
        hooks.append(hook)
    return hooks


def _apply_layout(config: Any, args: argparse.Namespace) -> None:
    if args.tp is not None:
        config.tensor_model_parallel_size = args.tp
    if args.pp is not None:
        config.pipeline_model_parallel_size = args.pp
    if args.vp is not None:
        config.virtual_pipeline_model_parallel_size = args.vp
    if args.ep is not None:
        config.expert_model_parallel_size = args.ep
    if args.etp is not None:
        config.expert_tensor_parallel_size = args.etp


def _expert_layout(config: Any) -> tuple[int, int | None]:
    """(ep, etp) of a MoE config; (1, None) for a dense one."""
    if not getattr(config, "num_moe_experts", None):
        return 1, None
    return config.expert_model_parallel_size or 1, config.expert_tensor_parallel_size


def run(args: argparse.Namespace) -> int:
    # megatron-core warns at import about optional GPU packages; the report says what was chosen.
    warnings.filterwarnings("ignore", module=r"megatron\.")
    # megatron calls all_gather_into_tensor / reduce_scatter_tensor, which torch 2.13 deprecates (renamed)
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    from plugtron.cli import manager_for
    from plugtron.config import load

    pm = manager_for(args)
    config = load(args.config, pm)
    _apply_layout(config, args)
    config.finalize()  # fail here, before any process is started
    _hooks(args.pre_wrap_hook, "--pre-wrap-hook")  # a wrong path fails here, before any rank starts
    _hooks(args.post_wrap_hook, "--post-wrap-hook")
    world = _world_size(config, args)
    if under_launcher():
        # An external launcher's extra ranks are data parallelism, unless --dp fixed the world.
        check_world(world, _layout_flags(config, args), exact=args.dp is not None)
    elif world > 1:
        return relaunch(world, args.argv)
    return _build_on_this_rank(config, args, pm)


def _layout_flags(config: Any, args: argparse.Namespace) -> str:
    """The layout as flags with the config's values (``--tp 4 --pp 2``), for messages."""
    ep, etp = _expert_layout(config)
    values = {"tp": config.tensor_model_parallel_size, "pp": config.pipeline_model_parallel_size, "ep": ep, "etp": etp}
    flags = [f"--{name} {value}" for name, value in values.items() if value not in (None, 1)]
    flags += [f"--dp {args.dp}"] if args.dp is not None else []
    return " ".join(flags) or "--tp 1 --pp 1"


def _world_size(config: Any, args: argparse.Namespace) -> int:
    """Ranks to start: tp x pp x dp, with dp by default as small as the expert layout allows (megatron's sizing)."""
    from plugtron.errors import ConfigError
    from plugtron.runtime.parallel import world_size_for

    tp, pp = config.tensor_model_parallel_size, config.pipeline_model_parallel_size
    ep, etp = _expert_layout(config)
    world = world_size_for(tp, pp, ep=ep, etp=etp, dp=args.dp)
    if world % ((etp or tp) * ep * pp):
        raise ConfigError(
            "expert_model_parallel_size",
            f"--dp {args.dp} gives {world} ranks, not divisible by expert_tensor_parallel x expert_model_parallel x pp "
            f"= {(etp or tp) * ep * pp}; leave --dp out to use the smallest layout that fits",
        )
    return world


def _build_on_this_rank(config: Any, args: argparse.Namespace, pm: Any) -> int:
    from plugtron.builder import BuildOptions
    from plugtron.pipeline import build_model
    from plugtron.runtime.parallel import initialize_parallel

    ep, etp = _expert_layout(config)
    parallel = initialize_parallel(
        config.tensor_model_parallel_size, config.pipeline_model_parallel_size,
        config.virtual_pipeline_model_parallel_size, ep=ep, etp=etp, timeout_s=FAILURE_TIMEOUT_S,
    )
    options = BuildOptions(meta_device=args.meta, wrap=args.wrap, print_report=False)
    built = build_model(config, parallel=parallel, options=options, pm=pm,
                        pre_wrap_hooks=_hooks(args.pre_wrap_hook, "--pre-wrap-hook"),
                        post_wrap_hooks=_hooks(args.post_wrap_hook, "--post-wrap-hook"))
    step = _step(built, config, args) if args.step else None
    _report(built, parallel, pm, step)
    return 0


def _step(built: Any, config: Any, args: argparse.Namespace) -> Any:
    from plugtron.training import random_batches, train_step

    seq = args.seq_length or min(config.seq_length, 64)
    batches = random_batches(built, max(1, config.pipeline_model_parallel_size), args.batch_size, seq)
    return train_step(built, batches)


def _report(built: Any, parallel: Any, pm: Any, step: Any) -> None:
    import torch.distributed as dist

    loss = None if step is None else step.loss
    gathered: list[Any] = [None] * parallel.world_size
    dist.all_gather_object(gathered, (built.report.peak_rss_mb, loss))
    if parallel.rank != 0:
        return
    report = built.report
    family = pm.family(report.family)
    losses = [value for _, value in gathered if value is not None]
    lines = [
        ("family", f"{report.family} ({family.distribution or 'in-process'})"),
        ("layer spec", f"{report.layer_spec} — {report.spec_reason}"),
        ("layout", f"tp={parallel.tp} pp={parallel.pp} vp={parallel.vp or '-'} dp={parallel.dp}"
                   + (f" ep={parallel.ep} etp={parallel.etp}" if getattr(built.context.builder.config, "num_moe_experts", None) else "")
                   + f" ({parallel.world_size} ranks, {parallel.backend}, {built.context.device})"),
        *[(f"params tp={tp} pp={pp}", f"{count:,}") for (tp, pp), count in sorted(report.params_per_rank.items())],
        ("build time", f"{report.build_seconds:.2f} s"),
        ("peak memory", f"{max(p for p, _ in gathered):.0f} MB (max over ranks)"),
    ]
    if losses:
        lines.append(("loss", f"{losses[0]:.4f}"))
    for name, value in (step.aux_losses.items() if step is not None else ()):
        lines.append((name, f"{value:.4f}"))
    if step is not None and step.mtp_loss is not None:
        lines.append(("mtp loss", f"{step.mtp_loss:.4f}"))
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key:<{width}}  {value}", flush=True)
