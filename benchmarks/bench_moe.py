"""Meta-device construction of frontier MoE shapes: DeepSeek-V3 (MLA, 256 experts, MTP) and Qwen3-235B-A22B.

    .venv/bin/python benchmarks/bench_moe.py             # both shapes, both sides (~1.5 min on 2 CPU cores)
    .venv/bin/python benchmarks/bench_moe.py --shapes qwen3-235b-a22b --repeats 2

One process, TP = PP = EP = 1 (every expert of every layer on this rank),
``use_cpu_initialization``, nothing materialised. Two sides, each in a fresh
interpreter (``_measure.run_isolated``; timings start after imports and
``initialize_parallel()``):

* **plugtron**: the pipeline's own construction steps, as ``build_with_builder``
  runs them: ``GPTModelConfig(...).finalize()``, the builder hook, spec
  selection, ``plugtron.pipeline.stages.build_stages(meta=True)``, which swaps
  megatron's init methods for a no-op while constructing (parameters are
  initialised or loaded after materialisation).
* **reference**: megatron's ``GPTModel`` under ``torch.device("meta")`` with the
  *same* layer spec objects and config, init methods left on (megatron draws
  ``normal_`` into every meta tensor through torch's reference
  decompositions: ~24k expert linears for DeepSeek-V3).

Reported per side: seconds, parameters, modules, the tensors that stay real
(computed buffers: YaRN caches, expert biases, token counters) and their size,
and the process's peak RSS (imports included). Information only; no target.
"""

from __future__ import annotations

import argparse
import json
import sys
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


def _config(shape: str) -> Any:
    import torch

    from plugtron_gpt.config import GPTModelConfig

    return GPTModelConfig(**SHAPES[shape], activation_func=torch.nn.functional.silu, layer_spec="torch")


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


def worker_plugtron(shape: str) -> dict[str, Any]:
    from plugtron.manager import get_plugin_manager
    from plugtron.pipeline import stages
    from plugtron.runtime.parallel import initialize_parallel

    parallel = initialize_parallel()
    with Stopwatch() as sw:
        pm = get_plugin_manager()
        config = _config(shape).finalize()
        builder = pm.hooks.create_builder(config, pm.family(config.family))
        builder.select_spec(pm)
        chunks = stages.build_stages(builder, parallel, meta=True)
    return _summary(sw.seconds, chunks)


def worker_direct(shape: str) -> dict[str, Any]:
    """megatron's GPTModel under the meta device with the same spec objects; init methods run."""
    import torch
    from megatron.core.models.gpt import GPTModel

    from plugtron.manager import get_plugin_manager
    from plugtron.runtime.parallel import initialize_parallel
    from plugtron_gpt.specs import stage_block_spec, torch_spec

    parallel = initialize_parallel()
    config = _config(shape).finalize()
    pm = get_plugin_manager()
    builder = pm.hooks.create_builder(config, pm.family(config.family))
    builder.select_spec(pm)  # 'torch', for the MTP block's backend
    with Stopwatch() as sw:
        spec = stage_block_spec(torch_spec(config), config, None)
        with torch.device("meta"):
            model = GPTModel(
                config=builder._transformer_config(), transformer_layer_spec=spec, vocab_size=config.padded_vocab_size(),
                max_sequence_length=config.seq_length, position_embedding_type="rope" if config.is_mla() else config.position_embedding_type,
                rotary_base=config.rotary_base, share_embeddings_and_output_weights=False, pg_collection=parallel.pg_collection,
                mtp_block_spec=builder.mtp_block_spec(spec, None),
            )
    return _summary(sw.seconds, [model])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    raw: dict[str, Any] = {}
    for shape in args.shapes.split(","):
        for side in ("plugtron", "direct"):
            runs = [run_isolated(f"bench_moe:worker_{side}", timeout=900, shape=shape) for _ in range(args.repeats)]
            raw[f"{shape}/{side}"] = runs
            first = runs[0]
            print(
                f"{shape:16s} {side:9s} {median([r['seconds'] for r in runs]):7.2f} s  "
                f"params {first['params'] / 1e9:7.1f}B  modules {first['modules']:6d}  "
                f"real tensors {first['real_tensors']:4d} ({first['real_mb']:.0f} MB)  "
                f"peak RSS {max(r['peak_rss_mb'] for r in runs) / 1024:.2f} GB",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(raw, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
