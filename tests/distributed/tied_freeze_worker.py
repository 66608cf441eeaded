"""torchrun worker for test_tied_embedding_freeze.py (PP=2, tied tiny GPT).

Builds the model once per wrap kind with a pre-wrap hook that freezes the
embedding of every chunk that has one (the ``plugtron_pre_wrap`` docstring's
example: only the first stage has an ``embedding``), runs one training step,
and writes what each rank saw to ``--out`` (rank 0). Any exception is recorded
instead of raised, so a refusal is as observable as a success.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from plugtron import hookimpl


class FreezeEmbedding:
    """The hookspec's example, verbatim in behaviour: this rank's embeddings only."""

    @hookimpl
    def plugtron_pre_wrap(self, model: list, config: Any, context: Any) -> None:
        for chunk in model:
            embedding = getattr(chunk, "embedding", None)
            if embedding is not None:
                embedding.requires_grad_(False)


def tiny_tied_gpt() -> Any:
    import torch
    from plugtron_gpt.config import GPTModelConfig

    return GPTModelConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
        vocab_size=128, make_vocab_size_divisible_by=64, seq_length=16, normalization="RMSNorm",
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
        share_embeddings_and_output_weights=True, layer_spec="local",
        pipeline_model_parallel_size=2,
    )


def _tied_copy(built: Any) -> Any:
    from plugtron.sharding import unwrap

    first, last = unwrap(built.chunks[0]), unwrap(built.chunks[-1])
    return (first if first.pre_process else last).shared_embedding_or_output_weight()


def run_one(wrap: str, timeout_s: float) -> dict:
    """Build, step, and describe this rank's tied copy; exceptions become a record.

    Each run re-initialises the (unchanged) layout, which re-seeds: every wrap
    starts from the same weights, so their losses must agree.
    """
    from plugtron.builder import BuildOptions
    from plugtron.manager import PlugtronPluginManager
    from plugtron.pipeline import build_model
    from plugtron.runtime.parallel import initialize_parallel
    from plugtron.training import forward_backward, random_batches

    parallel = initialize_parallel(1, 2, timeout_s=timeout_s)
    pm = PlugtronPluginManager()
    pm.register(FreezeEmbedding(), name="freeze-embedding")
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            built = build_model(tiny_tied_gpt(), parallel=parallel, options=BuildOptions(wrap=wrap, print_report=False), pm=pm)
            loss = forward_backward(built, random_batches(built, 2, 2, 16))
        except Exception as exc:  # noqa: BLE001 - the test judges the outcome
            return {"wrap": wrap, "error": f"{type(exc).__name__}: {exc}", "seconds": time.perf_counter() - started}
    weight = _tied_copy(built)
    trainable = [p for chunk in built.chunks for p in chunk.parameters() if p.requires_grad]
    return {
        "wrap": wrap,
        "pp_rank": parallel.pp_rank,
        "loss": loss,
        "tied_requires_grad": weight.requires_grad,
        "tied_grad_is_none": weight.grad is None and getattr(weight, "main_grad", None) is None,
        "others_have_grads": all(getattr(p, "main_grad", p.grad) is not None for p in trainable),
        "trainable": len(trainable),
        "warnings": [str(w.message) for w in caught if "tied" in str(w.message)],
        "seconds": time.perf_counter() - started,
    }


def main() -> int:
    import torch.distributed as dist

    warnings.filterwarnings("ignore", module=r"megatron\.")
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--wraps", default="none,ddp")
    parser.add_argument("--timeout-s", type=float, default=20.0)
    args = parser.parse_args()
    results = [run_one(wrap, args.timeout_s) for wrap in args.wraps.split(",")]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(gathered, indent=2))
    from plugtron.runtime.parallel import destroy_parallel

    destroy_parallel()  # a gloo group left to the interpreter's exit once aborted rank 1 ("terminate called ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
