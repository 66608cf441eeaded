"""The one shared build pipeline, used by every family.

Order (each step documented where it lives):

1. virtual-pipeline stages (:mod:`plugtron.pipeline.stages`)
2. pre-wrap hooks: plugins in pluggy order, then the builder's per-call hooks
   2b. the copies of a tied embedding agree on requires_grad (:mod:`plugtron.pipeline.tied`)
3. default tensor-parallel attributes on every parameter
4. device placement (CUDA when present, else CPU; meta builds stay put)
5. mixed-precision wrapper (:mod:`plugtron.pipeline.wrap`)
6. materialise meta tensors and initialise them (:mod:`plugtron.pipeline.materialize`)
7. DDP / megatron FSDP / FSDP2 wrapping, broadcast from data-parallel rank 0
8. post-wrap hooks, then 2b again
9. report parameters per (TP, PP) rank on rank 0
"""

from __future__ import annotations

import resource
import time
from typing import TYPE_CHECKING, Any, Sequence

import attrs

from plugtron.builder import BuildContext, BuildOptions, ModelBuilder, WrapHook
from plugtron.errors import PipelineError
from plugtron.facade import run_chain
from plugtron.pipeline import materialize, stages, tied, wrap

if TYPE_CHECKING:
    from plugtron.manager import PlugtronPluginManager
    from plugtron.runtime.parallel import ParallelContext


@attrs.define
class BuildReport:
    family: str
    layer_spec: str
    spec_reason: str
    params_per_rank: dict[tuple[int, int], int]
    build_seconds: float
    peak_rss_mb: float


@attrs.define
class BuiltModel:
    chunks: list
    context: BuildContext
    report: BuildReport


def _target_device(options: BuildOptions) -> str:
    import torch

    if options.device == "cuda" and not torch.cuda.is_available():
        raise PipelineError("build option device='cuda' but CUDA is not available")
    if options.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return options.device


def _check_options(config: Any, options: BuildOptions) -> None:
    if options.load_weights is not None and not options.meta_device:
        raise PipelineError("build option load_weights needs meta_device=True (weights are loaded once, into fresh storage)")
    if options.meta_device and not config.use_cpu_initialization:
        raise PipelineError(
            "meta-device builds need use_cpu_initialization=True (megatron's GPU initialisation "
            "path draws from the CUDA RNG and mixes devices)"
        )


def _place(chunks: list, device: str, options: BuildOptions, config: Any) -> None:
    """Step 4. FSDP2 with CPU initialisation shards first and moves shards later."""
    if options.meta_device or device == "cpu":
        return
    if options.wrap == "fsdp2" and config.use_cpu_initialization:
        return
    import torch

    for chunk in chunks:
        chunk.cuda(torch.cuda.current_device())


def build_with_builder(builder: ModelBuilder, parallel: "ParallelContext", pm: "PlugtronPluginManager", options: BuildOptions | None = None) -> BuiltModel:
    """Run the whole pipeline for a builder whose config is finalized."""
    options = options or BuildOptions()
    config = builder.config
    _check_options(config, options)
    started = time.perf_counter()
    choice = builder.select_spec(pm)
    device = _target_device(options)
    context = BuildContext(parallel=parallel, options=options, builder=builder, spec=choice, device=device)
    chunks = stages.build_stages(builder, parallel, meta=options.meta_device)  # 1
    chunks = pm.hooks.pre_wrap(chunks, config, context)  # 2
    chunks = run_chain([("builder", h) for h in builder.pre_wrap_hooks], chunks, config, context)
    tied.agree_tied_embeddings(chunks)  # 2b: before DDP builds buckets from requires_grad
    stages.set_tensor_parallel_defaults(chunks)  # 3
    _place(chunks, device, options, config)  # 4
    chunks = wrap.apply_mixed_precision(chunks, config, context)  # 5
    if options.meta_device:  # 6
        loader = options.load_weights
        for chunk in chunks:
            materialize.materialize(chunk, device, builder, None if loader is None else lambda c: loader(c, context))
    chunks = wrap.wrap_data_parallel(chunks, config, context)  # 7
    chunks = pm.hooks.post_wrap(chunks, config, context)  # 8
    chunks = run_chain([("builder", h) for h in builder.post_wrap_hooks], chunks, config, context)
    tied.agree_tied_embeddings(chunks)  # 8b: the step's tied-grad sync decides on requires_grad
    report = BuildReport(
        family=config.family,
        layer_spec=choice.info.name,
        spec_reason=choice.reason,
        params_per_rank=params_per_rank(chunks, parallel),  # 9
        build_seconds=time.perf_counter() - started,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    if options.print_report and parallel.rank == 0:
        print(format_params(report.params_per_rank), flush=True)
    return BuiltModel(chunks, context, report)


def format_params(params_per_rank: dict[tuple[int, int], int]) -> str:
    return "plugtron: parameters per rank: " + ", ".join(
        f"(tp={tp}, pp={pp}) {count:,}" for (tp, pp), count in sorted(params_per_rank.items())
    )


def params_per_rank(chunks: list, parallel: "ParallelContext") -> dict[tuple[int, int], int]:
    """Local parameter counts gathered from every rank, keyed by (tp_rank, pp_rank)."""
    import torch.distributed as dist

    local = sum(p.numel() for chunk in chunks for p in chunk.parameters())
    mine = (parallel.tp_rank, parallel.pp_rank, local)
    gathered: list[Any] = [None] * parallel.world_size
    dist.all_gather_object(gathered, mine)
    return {(tp, pp): count for tp, pp, count in gathered}


def build_model(
    config: Any,
    *,
    parallel: "ParallelContext | None" = None,
    options: BuildOptions | None = None,
    pm: "PlugtronPluginManager | None" = None,
    pre_wrap_hooks: Sequence[WrapHook] = (),
    post_wrap_hooks: Sequence[WrapHook] = (),
) -> BuiltModel:
    """Build any family's model: finalize the config, find its builder, run the pipeline.

    ``parallel`` defaults to a context initialised from the config's TP/PP/VP.

    ``pre_wrap_hooks`` / ``post_wrap_hooks`` are per-call hooks for this build
    only, ``hook(chunks, config, context) -> list | None`` (a returned list
    replaces the chunks). They are appended to the builder's per-call hooks
    (:meth:`ModelBuilder.register_pre_wrap_hook`), so the order is guaranteed:
    every plugin's ``plugtron_pre_wrap`` (pluggy order: tryfirst, newest,
    trylast), then hooks the builder registered on itself, then these, in list
    order. Pre-wrap hooks see the unwrapped chunks of step 2, before tied
    embeddings are checked, before placement, precision and DDP/FSDP;
    post-wrap hooks the wrapped chunks of step 8, and the same order holds.
    """
    from plugtron.manager import get_plugin_manager
    from plugtron.runtime.parallel import adapt_config, initialize_parallel

    for label, hooks in (("pre_wrap_hooks", pre_wrap_hooks), ("post_wrap_hooks", post_wrap_hooks)):
        if callable(hooks) or not all(callable(hook) for hook in hooks):
            raise PipelineError(f"build_model({label}=...) takes a list of functions hook(chunks, config, context), got {hooks!r}")
    pm = pm or get_plugin_manager()
    family = pm.family(config.family)
    config.finalize()
    if parallel is None:
        moe = bool(getattr(config, "num_moe_experts", None))
        parallel = initialize_parallel(
            config.tensor_model_parallel_size,
            config.pipeline_model_parallel_size,
            config.virtual_pipeline_model_parallel_size,
            ep=(getattr(config, "expert_model_parallel_size", 1) or 1) if moe else 1,
            etp=getattr(config, "expert_tensor_parallel_size", None) if moe else None,
        )
    _check_layout(config, parallel)
    if adapt_config(config, parallel):
        config.finalize()
    builder = pm.hooks.create_builder(config, family)
    for hook in pre_wrap_hooks:
        builder.register_pre_wrap_hook(hook)
    for hook in post_wrap_hooks:
        builder.register_post_wrap_hook(hook)
    return build_with_builder(builder, parallel, pm, options)


def _check_layout(config: Any, parallel: "ParallelContext") -> None:
    wanted = (config.tensor_model_parallel_size, config.pipeline_model_parallel_size, config.virtual_pipeline_model_parallel_size)
    have = (parallel.tp, parallel.pp, parallel.vp)
    if wanted != have:
        raise PipelineError(f"config asks for (tp, pp, vp) = {wanted} but the parallel context is {have}")
