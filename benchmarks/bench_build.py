"""Eager CPU builds: plugtron's full pipeline vs megatron-core called directly.

Each worker runs in its own process (see ``_measure.run_isolated``). Both
import the same modules first and both call
``plugtron.runtime.parallel.initialize_parallel()`` before the clock starts;
the timed region is "config keywords in, model out":

* plugtron: ``GPTModelConfig(...)`` + ``build_model(config, parallel=...)``
  (plugin manager creation and entry-point loading, finalize, family lookup,
  builder hook, spec selection, every pipeline step, parameter report);
* direct: ``TransformerConfig(...)`` + layer spec + ``GPTModel(...)``.
"""

from __future__ import annotations

from typing import Any

from _measure import Stopwatch, alternate, build_summary, median


def _prepare(plugtron: bool) -> Any:
    import _models

    _models.import_build_path(plugtron)
    from plugtron.runtime.parallel import initialize_parallel

    return initialize_parallel()


def worker_plugtron(shape: str, meta_device: bool = False) -> dict[str, Any]:
    import _models

    parallel = _prepare(plugtron=True)
    from plugtron.builder import BuildOptions
    from plugtron.pipeline.build import build_model

    inside = _time_build_stage()
    with Stopwatch() as sw:
        config = _models.plugtron_config(_models.SHAPES[shape])
        built = build_model(config, parallel=parallel, options=BuildOptions(meta_device=meta_device))
    return {"seconds": sw.seconds, "construct_seconds": sum(inside), "params": _models.count_params(built.chunks),
            "meta_params": sum(p.is_meta for c in built.chunks for p in c.parameters())}


def _time_build_stage() -> list[float]:
    """Record the seconds spent in the GPT builder's ``build_stage`` (megatron's ``GPTModel(...)``).

    Instrumentation for this benchmark process only: the build total minus
    this is what the pipeline itself costs, measured in one process and so
    free of the between-process noise that the cross-process ratio carries.
    """
    import time

    from plugtron_gpt.builder import GPTModelBuilder

    seconds: list[float] = []
    original = GPTModelBuilder.build_stage

    def build_stage(self, **kwargs):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        try:
            return original(self, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    GPTModelBuilder.build_stage = build_stage  # type: ignore[method-assign]
    return seconds


def worker_direct(shape: str) -> dict[str, Any]:
    import _models

    parallel = _prepare(plugtron=False)
    with Stopwatch() as sw:
        model = _models.build_direct(_models.SHAPES[shape], parallel)
    return {"seconds": sw.seconds, "params": _models.count_params(model), "meta_params": 0}


def compare(shape: str, repeats: int, forked: bool = True) -> dict[str, Any]:
    """Median build seconds of each path over ``repeats`` new processes, interleaved.

    ``forked``: fork each process from a preloaded server instead of starting
    a new interpreter (same timings, ~5 s less import per process).
    """
    runs = alternate(
        [("plugtron", "bench_build:worker_plugtron"), ("direct", "bench_build:worker_direct")],
        repeats, forked=forked, shape=shape,
    )
    return _summary(shape, runs["plugtron"], runs["direct"])


def meta_materialised(shape: str, repeats: int, forked: bool = True) -> dict[str, Any]:
    """``BuildOptions(meta_device=True)``: meta construction, then materialise + initialise."""
    from _measure import run_forked, run_isolated

    run = run_forked if forked else run_isolated
    runs = [run("bench_build:worker_plugtron", shape=shape, meta_device=True) for _ in range(repeats)]
    return {
        "shape": shape,
        "seconds": median([r["seconds"] for r in runs]),
        "samples": [r["seconds"] for r in runs],
        "rss_mb": median([r["peak_rss_mb"] for r in runs]),
        "params": runs[0]["params"],
        "materialised": all(r["meta_params"] == 0 for r in runs),
    }


def _summary(shape: str, mine: list[dict[str, Any]], ref: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        **build_summary(shape, mine, ref),
        "plugtron_construct_s": median([r["construct_seconds"] for r in mine]),
        "pipeline_overhead_s": median([r["seconds"] - r["construct_seconds"] for r in mine]),
        "inprocess_ratio": median([r["seconds"] / r["construct_seconds"] for r in mine]),
    }
