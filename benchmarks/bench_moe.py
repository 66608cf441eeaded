"""Mixture-of-Experts benchmarks: frontier-shape meta construction, and training throughput of a small MoE.

    .venv/bin/python benchmarks/bench_moe.py                 # every row (~2 min on 2 CPU cores)
    .venv/bin/python benchmarks/bench_moe.py --shapes qwen3-235b-a22b --repeats 2 --no-tokens

**Meta-device construction** of a DeepSeek-V3 shape (61 layers, MLA, 256
experts, MTP) and a Qwen3-235B-A22B shape. One process, TP = PP = EP = 1
(every expert of every layer on this rank), ``use_cpu_initialization``,
nothing materialised. Two sides, each in a fresh interpreter
(``_measure.run_isolated``); timings start after imports and
``initialize_parallel()``:

* **plugtron**: the pipeline's own construction steps, as ``build_with_builder``
  runs them: ``GPTModelConfig(...).finalize()``, the builder hook, spec
  selection, ``plugtron.pipeline.stages.build_stages(meta=True)``. Under meta it
  swaps megatron's init methods for a no-op, lets megatron's CPU weight
  initialisation only mark the tensor-parallel attributes (no master weight,
  split and concatenation), pauses the cyclic garbage collector, and computes
  each distinct YaRN cache once (parameters are initialised or loaded after
  materialisation).
* **direct**: megatron's ``GPTModel`` under ``torch.device("meta")`` with the
  *same* layer spec objects and config, as megatron runs it (init methods on).

Judged per shape: plugtron's seconds (< 5 s), the process's peak RSS (imports
included, < 1 GB), and plugtron / direct (<= 1.05).

**Training throughput** of a small MoE (4 layers, hidden 256, 8 experts top-2,
alltoall dispatcher, aux loss): plugtron's ``build_model`` and
``plugtron.training.forward_backward`` against megatron's ``GPTModel`` built
with the same spec and stepped with megatron's ``get_forward_backward_func``
and an equivalent forward step. Both models live in one process and their
steps alternate (see ``bench_train``: load on a shared 2-core machine comes in
bursts); each side's throughput is its fastest step; the row is the median over
``--token-repeats`` processes. Judged: ratio >= 0.95 (1.00 within noise).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import Stopwatch, median, run_isolated  # noqa: E402

_BASE = {
    "use_cpu_initialization": True, "normalization": "RMSNorm", "gated_linear_unit": True, "add_bias_linear": False,
    "hidden_dropout": 0.0, "attention_dropout": 0.0, "make_vocab_size_divisible_by": 128, "seq_length": 4096,
}
SHAPES: dict[str, dict[str, Any]] = {
    # DeepSeek-V3 (671B + 14B MTP): 61 layers, first 3 dense, MLA, 256 routed experts top-8 + 1 shared.
    "deepseek-v3": {
        **_BASE, "num_layers": 61, "hidden_size": 7168, "num_attention_heads": 128, "ffn_hidden_size": 18432,
        "vocab_size": 129280, "multi_latent_attention": True, "q_lora_rank": 1536, "kv_lora_rank": 512,
        "qk_head_dim": 128, "qk_pos_emb_head_dim": 64, "v_head_dim": 128, "qk_layernorm": True,
        "position_embedding_type": "yarn", "yarn_rotary_scaling_factor": 40.0, "yarn_original_max_position_embeddings": 4096,
        "yarn_mscale": 1.0, "yarn_mscale_all_dim": 1.0, "num_moe_experts": 256, "moe_router_topk": 8,
        "moe_ffn_hidden_size": 2048, "moe_shared_expert_intermediate_size": 2048, "moe_layer_freq": [0] * 3 + [1] * 58,
        "moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True, "moe_router_num_groups": 8,
        "moe_router_group_topk": 4, "moe_router_topk_scaling_factor": 2.5, "moe_router_load_balancing_type": "seq_aux_loss",
        "moe_aux_loss_coeff": 0.0001, "moe_token_dispatcher_type": "alltoall", "moe_router_dtype": "fp32", "mtp_num_layers": 1,
    },
    # Qwen3-235B-A22B: 94 layers, GQA 64/4 heads of 128, QK norm, 128 experts top-8.
    "qwen3-235b-a22b": {
        **_BASE, "num_layers": 94, "hidden_size": 4096, "num_attention_heads": 64, "num_query_groups": 4,
        "kv_channels": 128, "ffn_hidden_size": 12288, "vocab_size": 151936, "qk_layernorm": True, "rotary_base": 1000000,
        "num_moe_experts": 128, "moe_router_topk": 8, "moe_ffn_hidden_size": 1536, "moe_aux_loss_coeff": 0.001,
        "moe_token_dispatcher_type": "alltoall",
    },
}
#: The throughput row's model (~13M parameters): small enough for a few steps in seconds on 2 cores.
SMALL_MOE: dict[str, Any] = {
    **_BASE, "seq_length": 256, "num_layers": 4, "hidden_size": 256, "num_attention_heads": 4, "ffn_hidden_size": 512,
    "vocab_size": 8192, "num_moe_experts": 8, "moe_router_topk": 2, "moe_ffn_hidden_size": 256,
    "moe_token_dispatcher_type": "alltoall", "moe_aux_loss_coeff": 0.01,
}
TARGET_SECONDS, TARGET_RSS_GB, TARGET_RATIO, TARGET_TOKENS = 5.0, 1.0, 1.05, 0.95
#: Imported before any timing, on both sides: timings are construction, not imports.
_BUILD_PATH = (
    "megatron.core.models.gpt", "megatron.core.models.gpt.gpt_layer_specs", "megatron.core.transformer.moe.moe_layer",
    "megatron.core.transformer.moe.experts", "megatron.core.transformer.multi_latent_attention",
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding", "megatron.core.transformer.multi_token_prediction",
    "plugtron.pipeline.build", "plugtron.training", "plugtron_gpt.builder", "plugtron_gpt.config", "plugtron_gpt.specs",
)


def _config(fields: dict[str, Any]) -> Any:
    import torch

    from plugtron_gpt.config import GPTModelConfig

    return GPTModelConfig(**fields, activation_func=torch.nn.functional.silu, layer_spec="torch")


def _prepare() -> Any:
    import importlib

    from plugtron.runtime.parallel import initialize_parallel

    for name in _BUILD_PATH:
        importlib.import_module(name)
    return initialize_parallel()


def _summary(seconds: float, modules: list) -> dict[str, Any]:
    tensors = [t for m in modules for t in list(m.parameters()) + list(m.buffers())]
    real = [t for t in tensors if not t.is_meta]
    return {
        "seconds": seconds,
        "params": sum(p.numel() for m in modules for p in m.parameters()),
        "modules": sum(1 for m in modules for _ in m.modules()),
        "real_tensors": len(real),
        "real_mb": sum(t.numel() * t.element_size() for t in real) / 2**20,
    }


def _direct_model(config: Any, builder: Any, parallel: Any) -> Any:
    """megatron's GPTModel with the GPT family's ``torch`` spec objects (built under whatever device is current)."""
    from megatron.core.models.gpt import GPTModel

    from plugtron_gpt.specs import stage_block_spec, torch_spec

    spec = stage_block_spec(torch_spec(config), config, None)
    return GPTModel(
        config=builder._transformer_config(), transformer_layer_spec=spec, vocab_size=config.padded_vocab_size(),
        max_sequence_length=config.seq_length, position_embedding_type="rope" if config.is_mla() else config.position_embedding_type,
        rotary_base=config.rotary_base, share_embeddings_and_output_weights=False, pg_collection=parallel.pg_collection,
        mtp_block_spec=builder.mtp_block_spec(spec, None),
    )


def _builder(config: Any) -> Any:
    from plugtron.manager import get_plugin_manager

    pm = get_plugin_manager()
    builder = pm.hooks.create_builder(config, pm.family(config.family))
    builder.select_spec(pm)  # 'torch', for the MTP block's backend
    return builder


# -- meta-device construction ---------------------------------------------------------
def worker_plugtron(shape: str) -> dict[str, Any]:
    from plugtron.pipeline import stages

    parallel = _prepare()
    with Stopwatch() as sw:
        builder = _builder(_config(SHAPES[shape]).finalize())
        chunks = stages.build_stages(builder, parallel, meta=True)
    return _summary(sw.seconds, chunks)


def worker_direct(shape: str) -> dict[str, Any]:
    """megatron's GPTModel under the meta device with the same spec objects; init methods run."""
    import torch

    parallel = _prepare()
    config = _config(SHAPES[shape]).finalize()
    builder = _builder(config)
    with Stopwatch() as sw, torch.device("meta"):
        model = _direct_model(config, builder, parallel)
    return _summary(sw.seconds, [model])


def construction_rows(shapes: list[str], repeats: int, raw: dict[str, Any]) -> list[str]:
    lines = []
    for shape in shapes:
        sides = {side: [run_isolated(f"bench_moe:worker_{side}", timeout=900, shape=shape) for _ in range(repeats)]
                 for side in ("plugtron", "direct")}
        raw[shape] = sides
        mine, ref = (median([r["seconds"] for r in sides[s]]) for s in ("plugtron", "direct"))
        rss = max(r["peak_rss_mb"] for r in sides["plugtron"]) / 1024
        first = sides["plugtron"][0]
        lines.append(
            f"meta {shape} ({first['params'] / 1e9:.1f}B params, {first['modules']} modules, {first['real_mb']:.0f} MB real): "
            f"plugtron {mine:.2f} s {_mark(mine < TARGET_SECONDS)} (< {TARGET_SECONDS:g} s), "
            f"peak RSS {rss:.2f} GB {_mark(rss < TARGET_RSS_GB)} (< {TARGET_RSS_GB:g} GB); "
            f"direct {ref:.2f} s, ratio {mine / ref:.3f} {_mark(mine / ref <= TARGET_RATIO)} (<= {TARGET_RATIO})"
        )
        print(lines[-1], flush=True)
    return lines


# -- training throughput ----------------------------------------------------------------
def _plugtron_step(parallel: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    from plugtron.builder import BuildOptions
    from plugtron.pipeline.build import build_model
    from plugtron.training import forward_backward

    built = build_model(_config(SMALL_MOE), parallel=parallel, options=BuildOptions(print_report=False))
    chunk = built.chunks[0]
    return (lambda: forward_backward(built, [batch])), (lambda: chunk.zero_grad(set_to_none=True))


def _direct_step(parallel: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    import _models

    config = _config(SMALL_MOE).finalize()
    model = _direct_model(config, _builder(config), parallel)
    # megatron's training loop clears the aux-loss tracker when it logs; plugtron's step does too
    return _models.direct_step(model, batch, after=clear_aux_losses_tracker), (lambda: model.zero_grad(set_to_none=True))


def worker_tokens(batch_size: int, warmup: int, steps: int, direct_first: bool) -> dict[str, Any]:
    from bench_train import _batch, _result

    parallel = _prepare()
    batch = _batch(SMALL_MOE["vocab_size"], batch_size, SMALL_MOE["seq_length"], seed=0)
    makers = [("plugtron", _plugtron_step), ("direct", _direct_step)]
    sides = {name: make(parallel, batch) for name, make in (reversed(makers) if direct_first else makers)}
    times: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    for index in range(warmup + steps):
        for name in list(sides) if index % 2 == 0 else reversed(list(sides)):
            step, zero = sides[name]
            zero()
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            if index >= warmup:
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    return {name: _result(times[name], cpu[name], batch_size, SMALL_MOE["seq_length"], 0) for name in sides}


def tokens_row(repeats: int, raw: dict[str, Any]) -> str:
    runs = [run_isolated("bench_moe:worker_tokens", timeout=900, batch_size=2, warmup=2, steps=6, direct_first=bool(i % 2))
            for i in range(repeats)]
    raw["tokens"] = runs
    mine, ref = (median([r[s]["tokens_per_s"] for r in runs]) for s in ("plugtron", "direct"))
    ratio = median([r["plugtron"]["tokens_per_s"] / r["direct"]["tokens_per_s"] for r in runs])
    line = (f"fwd+bwd tokens/s small MoE (4 layers, 8 experts top-2, 2x256 tokens): plugtron {mine:.0f}, direct {ref:.0f}, "
            f"ratio {ratio:.3f} {_mark(ratio >= TARGET_TOKENS)} (>= {TARGET_TOKENS}; per process: "
            + ", ".join(f"{r['plugtron']['tokens_per_s'] / r['direct']['tokens_per_s']:.3f}" for r in runs) + ")")
    print(line, flush=True)
    return line


def _mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--repeats", type=int, default=1, help="processes per construction side")
    parser.add_argument("--token-repeats", type=int, default=3, help="processes for the throughput row")
    parser.add_argument("--no-tokens", action="store_true", help="skip the throughput row")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    raw: dict[str, Any] = {}
    lines = construction_rows([s for s in args.shapes.split(",") if s], args.repeats, raw)
    if not args.no_tokens:
        lines.append(tokens_row(args.token_repeats, raw))
    if args.json:
        args.json.write_text(json.dumps(raw, indent=2))
    return 0 if all("✗" not in line for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
