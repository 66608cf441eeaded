"""Meta-device construction of large shapes (Llama-3 8B / 70B), never materialised.

``BuildOptions(meta_device=True)`` always materialises (8B in fp32 is 32 GB),
so construction alone goes through the pipeline's own pieces, as
``build_with_builder`` uses them: finalize the config, ask the plugin manager
for the family's builder, ``builder.select_spec(pm)``, then
``plugtron.pipeline.stages.build_stages(builder, parallel, meta=True)``.
The reference builds megatron's ``GPTModel`` directly under
``torch.device("meta")``.

Both time from config keywords to the meta model, after imports and
``initialize_parallel()``. Peak RSS is the whole process (imports included);
``construct_rss_mb`` is the peak during construction alone (VmHWM reset just
before it, where the kernel allows).
"""

from __future__ import annotations

from typing import Any

from _measure import Stopwatch, alternate, build_summary, current_rss_mb, median, peak_rss_mb, reset_peak_rss


def _prepare(plugtron: bool) -> Any:
    import _models

    _models.import_build_path(plugtron)
    from plugtron.runtime.parallel import initialize_parallel

    return initialize_parallel()


def worker_plugtron(shape: str) -> dict[str, Any]:
    import _models

    parallel = _prepare(plugtron=True)
    from plugtron.manager import get_plugin_manager
    from plugtron.pipeline import stages

    before = current_rss_mb()
    process_peak = peak_rss_mb()
    reset = reset_peak_rss()
    with Stopwatch() as sw:
        pm = get_plugin_manager()
        config = _models.plugtron_config(_models.SHAPES[shape]).finalize()
        builder = pm.hooks.create_builder(config, pm.family(config.family))
        builder.select_spec(pm)
        chunks = stages.build_stages(builder, parallel, meta=True)
    return _result(sw.seconds, chunks, before, process_peak, reset)


def worker_direct(shape: str) -> dict[str, Any]:
    import torch

    import _models

    parallel = _prepare(plugtron=False)
    before = current_rss_mb()
    process_peak = peak_rss_mb()
    reset = reset_peak_rss()
    with Stopwatch() as sw:
        with torch.device("meta"):
            model = _models.build_direct(_models.SHAPES[shape], parallel)
    return _result(sw.seconds, [model], before, process_peak, reset)


def _result(seconds: float, chunks: list, before: float, process_peak: float, reset: bool) -> dict[str, Any]:
    params = list(p for c in chunks for p in c.parameters())
    return {
        "seconds": seconds,
        "params": sum(p.numel() for p in params),
        "all_meta": all(p.is_meta for p in params),
        "rss_before_mb": before,
        "construct_rss_mb": peak_rss_mb() if reset else float("nan"),
        # whole-process peak: what it was before the reset, or what it reached since
        "peak_rss_mb": max(process_peak, peak_rss_mb()),
    }


def compare(shape: str, repeats: int) -> dict[str, Any]:
    runs = alternate([("plugtron", "bench_meta:worker_plugtron"), ("direct", "bench_meta:worker_direct")], repeats, shape=shape)
    mine, ref = runs["plugtron"], runs["direct"]
    return {
        **build_summary(shape, mine, ref, rss=max),  # the largest peak: the target is a bound
        "plugtron_construct_rss_mb": max(r["construct_rss_mb"] for r in mine),
        "plugtron_rss_before_mb": median([r["rss_before_mb"] for r in mine]),
        "all_meta": all(r["all_meta"] for r in mine + ref),
    }
