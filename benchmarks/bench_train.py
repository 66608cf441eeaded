"""Forward+backward throughput of a small GPT: built by plugtron vs built directly.

plugtron side: ``build_model`` then ``plugtron.training.forward_backward`` (the
path ``plugtron build --step`` uses). Direct side: megatron's ``GPTModel`` built
by hand and the same megatron schedule (``get_forward_backward_func``) with an
equivalent forward step and loss. Same shape, same batch size and sequence
length, same tokens (weights differ, which does not matter for speed).
Gradients are cleared between steps, outside the timed region, on both sides.

Both models live in one (new) process and their steps alternate
(A B, B A, A B ...): on a 2-core machine that other work shares, load comes
in bursts of seconds to minutes, and two processes run one after the other
see different machines (measured: ratios of 0.5 to 2 from that alone). Steps
that alternate share the same load. Each side's throughput is that of its
fastest timed step, the estimate least disturbed by other load (the median
step is recorded too); the row reports the median over a few such processes,
which build the two models in alternating order.
"""

from __future__ import annotations

import time
from typing import Any

from _measure import median


def _batch(vocab: int, batch_size: int, seq_length: int, seed: int) -> dict[str, Any]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch_size, seq_length + 1), generator=gen)
    positions = torch.arange(seq_length).unsqueeze(0).expand(batch_size, -1).contiguous()
    return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(), "position_ids": positions}


def _plugtron_side(spec: dict[str, Any], parallel: Any, batch: dict[str, Any]) -> tuple[Any, Any, int]:
    import _models
    from plugtron.pipeline.build import build_model
    from plugtron.training import forward_backward

    built = build_model(_models.plugtron_config(spec), parallel=parallel)
    chunk = built.chunks[0]
    return (lambda: forward_backward(built, [batch])), (lambda: chunk.zero_grad(set_to_none=True)), _models.count_params(built.chunks)


def _direct_side(spec: dict[str, Any], parallel: Any, batch: dict[str, Any]) -> tuple[Any, Any, int]:
    import _models

    model = _models.build_direct(spec, parallel)
    return _models.direct_step(model, batch), (lambda: model.zero_grad(set_to_none=True)), _models.count_params(model)


def worker_paired(shape: str, batch_size: int, warmup: int, steps: int, direct_first: bool = False) -> dict[str, Any]:
    import _models

    _models.import_build_path(plugtron=True)
    from plugtron.runtime.parallel import initialize_parallel

    spec = _models.SHAPES[shape]
    parallel = initialize_parallel()
    batch = _batch(spec["vocab_size"], batch_size, spec["seq_length"], seed=0)
    builders = [("plugtron", _plugtron_side), ("direct", _direct_side)]
    sides = {name: make(spec, parallel, batch) for name, make in (reversed(builders) if direct_first else builders)}
    times: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    order = list(sides)
    for index in range(warmup + steps):
        for name in order if index % 2 == 0 else reversed(order):
            step, zero, _ = sides[name]
            zero()
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            if index >= warmup:
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    return {name: _result(times[name], cpu[name], batch_size, spec["seq_length"], sides[name][2]) for name in sides}


def _result(times: list[float], cpu: list[float], batch_size: int, seq_length: int, params: int) -> dict[str, Any]:
    """Throughput of the fastest step (the one least disturbed by other load), of the median step,
    and per CPU-second (process CPU time of the median step, all threads)."""
    tokens_per_step = batch_size * seq_length
    return {
        "tokens_per_s": tokens_per_step / min(times),
        "median_tokens_per_s": tokens_per_step / median(times),
        "tokens_per_cpu_s": tokens_per_step / median(cpu),
        "step_s": times,
        "step_cpu_s": cpu,
        "seq_length": seq_length,
        "params": params,
    }


def compare(shape: str, repeats: int, batch_size: int, warmup: int, steps: int, forked: bool = True) -> dict[str, Any]:
    from _measure import run_forked, run_isolated

    run = run_forked if forked else run_isolated
    runs = [
        run("bench_train:worker_paired", shape=shape, batch_size=batch_size, warmup=warmup, steps=steps,
            direct_first=bool(index % 2))
        for index in range(repeats)
    ]
    mine, ref = [r["plugtron"] for r in runs], [r["direct"] for r in runs]
    return {
        "shape": shape,
        "seq_length": mine[0]["seq_length"],
        "plugtron_tps": median([r["tokens_per_s"] for r in mine]),
        "direct_tps": median([r["tokens_per_s"] for r in ref]),
        "ratio": median([a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(mine, ref)]),
        "cpu_ratio": median([a["tokens_per_cpu_s"] / b["tokens_per_cpu_s"] for a, b in zip(mine, ref)]),
        "plugtron_tokens_per_cpu_s": median([r["tokens_per_cpu_s"] for r in mine]),
        "direct_tokens_per_cpu_s": median([r["tokens_per_cpu_s"] for r in ref]),
        "plugtron_samples": [r["tokens_per_s"] for r in mine],
        "direct_samples": [r["tokens_per_s"] for r in ref],
        "plugtron_median_step_tps": median([r["median_tokens_per_s"] for r in mine]),
        "direct_median_step_tps": median([r["median_tokens_per_s"] for r in ref]),
        "params": mine[0]["params"],
        "same_params": all(r["params"] == ref[0]["params"] for r in mine + ref),
    }
