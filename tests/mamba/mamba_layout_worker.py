"""Run under torchrun: rebuild reference Mamba/hybrid models in TP/PP/VP layouts and compare.

The reference (config, full weights, micro-batches, logits, loss, gradients)
comes from a single process. Each scenario loads the same weights into every
rank's slices through a pre-wrap hook, using the family's slicing rule
(:mod:`plugtron_mamba.tp_layout`: the mixer's fused ``in_proj``/``conv1d`` are
split block by block), then runs megatron's schedules through
``plugtron.training`` and gathers logits and gradients back to full tensors
under their global names. A scenario may ask for sequence parallelism
(``sp``) and a data-parallel wrapper (``wrap``).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")

from plugtron import hookimpl  # noqa: E402
from plugtron.builder import BuildOptions  # noqa: E402
from plugtron.config import from_dict  # noqa: E402
from plugtron.manager import PlugtronPluginManager  # noqa: E402
from plugtron.pipeline import build_model  # noqa: E402
from plugtron.runtime.parallel import initialize_parallel  # noqa: E402
from plugtron.sharding import layer_offset, to_global_name, unwrap  # noqa: E402
from plugtron.training import forward_backward  # noqa: E402
from plugtron_mamba import tp_layout  # noqa: E402

TIED = "embedding.word_embeddings.weight"


def global_name(name: str, offset: int, config) -> str:
    name = to_global_name(name, offset)
    return TIED if config.share_embeddings_and_output_weights and name == "output_layer.weight" else name


class LoadReference:
    """A plugin whose pre-wrap hook copies the reference weights into each rank's slices."""

    def __init__(self, state: dict) -> None:
        self.state = state

    @hookimpl
    def plugtron_pre_wrap(self, model, config, context):
        tp, rank = context.parallel.tp, context.parallel.tp_rank
        for chunk in model:
            offset = layer_offset(chunk)
            for name, param in unwrap(chunk).named_parameters():
                gname = global_name(name, offset, config)
                with torch.no_grad():
                    param.copy_(tp_layout.tp_slice(self.state[gname], gname, param, rank, tp, config))


def collect_logits(built, batches: list) -> list:
    """Logits of every micro-batch through megatron's schedules (forward only; last stage only)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    builder, chunks = built.context.builder, built.chunks

    def step(iterator, model):
        output = builder.forward_step(model, dict(next(iterator), labels=None))
        return output, lambda out: (out.float().sum() * 0.0, {"logits": out.detach().clone()})

    iterators = [iter(batches) for _ in chunks]
    results = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=len(batches),
        seq_length=batches[0]["tokens"].shape[1], micro_batch_size=batches[0]["tokens"].shape[0], forward_only=True,
    )
    return [r["logits"] for r in results or []]


def logits_diff(local: list, ref: list, parallel) -> float | None:
    """Worst |logits - reference| on this rank (vocab shards gathered over TP), None off the last stage."""
    from megatron.core import parallel_state

    if not local:
        return None
    group = parallel_state.get_tensor_model_parallel_group()
    worst = 0.0
    for mine, expected in zip(local, ref):
        parts = [torch.empty_like(mine) for _ in range(parallel.tp)]
        dist.all_gather(parts, mine.contiguous(), group=group)
        worst = max(worst, float((torch.cat(parts, dim=-1) - expected).abs().max()))
    return worst


def grad_diff(built, config, ref_grads: dict) -> tuple[float, str, int]:
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    worst, worst_name, checked = 0.0, "", 0
    for chunk in built.chunks:
        offset = layer_offset(chunk)
        for name, param in unwrap(chunk).named_parameters():
            gname = global_name(name, offset, config)
            grad = param.main_grad if hasattr(param, "main_grad") else param.grad  # DDP keeps it in main_grad
            full = tp_layout.tp_gather(grad, gname, param, group, built.context.parallel.tp, config)
            diff = float((full.float() - ref_grads[gname]).abs().max())
            checked += 1
            if diff > worst:
                worst, worst_name = diff, gname
    return worst, worst_name, checked


def checkpoint_keys(built) -> set:
    """Keys of the distributed-checkpoint tensors this rank saves (global layer numbers)."""
    keys = set()
    for chunk in built.chunks:
        for value in unwrap(chunk).sharded_state_dict().values():
            key = getattr(value, "key", None)
            if key is not None and not key.endswith("_extra_state"):
                keys.add(key)
    return keys


def run_scenario(ref: dict, scenario: dict) -> dict:
    config = from_dict(ref["config"], PlugtronPluginManager())
    tp, pp, vp = scenario.get("tp", 1), scenario.get("pp", 1), scenario.get("vp")
    config.tensor_model_parallel_size, config.pipeline_model_parallel_size = tp, pp
    config.virtual_pipeline_model_parallel_size = vp
    config.sequence_parallel = bool(scenario.get("sp"))
    parallel = initialize_parallel(tp, pp, vp, timeout_s=120)
    pm = PlugtronPluginManager()
    pm.register(LoadReference(ref["state"]), name="load-reference")
    built = build_model(config, parallel=parallel, options=BuildOptions(wrap=scenario.get("wrap", "none")), pm=pm)
    logits = logits_diff(collect_logits(built, ref["batches"]), ref["logits"], parallel)
    loss = forward_backward(built, ref["batches"])
    worst, worst_name, checked = grad_diff(built, config, ref["grads"])
    gathered: list = [None] * parallel.world_size
    dist.all_gather_object(gathered, (loss, logits, worst, worst_name, checked, checkpoint_keys(built)))
    losses = [g[0] for g in gathered if g[0] is not None]
    logit_diffs = [g[1] for g in gathered if g[1] is not None]
    return {
        "name": scenario["name"],
        "loss": sum(losses) / len(losses),
        "ref_loss": ref["loss"],
        "max_logits_diff": max(logit_diffs),
        "max_grad_diff": max(g[2] for g in gathered),
        "worst": max(gathered, key=lambda g: g[2])[3],
        "params_checked": sum(g[4] for g in gathered),
        "checkpoint_keys_match": set().union(*(g[5] for g in gathered)) == set(ref["state"]),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ref", required=True)
    parser.add_argument("--scenarios", required=True, help="JSON list of scenarios")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    refs = torch.load(args.ref, weights_only=False)
    results = [run_scenario(refs[s["ref"]], s) for s in json.loads(args.scenarios)]
    if dist.get_rank() == 0:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
