"""Run under torchrun: rebuild a reference model in several layouts and compare.

The reference (weights, micro-batches, loss, gradients) comes from a single
process; each scenario loads the same weights through a pre-wrap hook (before
DDP/FSDP wrapping), runs megatron's schedules through plugtron.training, then
gathers gradients back to global names and reports the worst difference.
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
from plugtron.sharding import layer_offset, to_global_name, tp_gather, tp_slice, unwrap  # noqa: E402
from plugtron.training import forward_backward  # noqa: E402

TIED = "embedding.word_embeddings.weight"


def _global(name: str, offset: int, tied: bool) -> str:
    name = to_global_name(name, offset)
    return TIED if tied and name == "output_layer.weight" else name


def _glu(config, name: str) -> bool:
    return bool(config.gated_linear_unit) and "linear_fc1" in name


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
                full = self.state[_global(name, offset, config.share_embeddings_and_output_weights)]
                with torch.no_grad():
                    param.copy_(tp_slice(full, param, rank, tp, glu=_glu(config, name)))


def _grad(param) -> torch.Tensor:
    grad = getattr(param, "main_grad", None)
    grad = param.grad if grad is None else grad
    return grad.full_tensor() if hasattr(grad, "full_tensor") else grad


def _compare_grads(built, config, ref_grads: dict) -> tuple[float, str, int]:
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    worst, worst_name, checked = 0.0, "", 0
    for chunk in built.chunks:
        offset = layer_offset(chunk)
        for name, param in unwrap(chunk).named_parameters():
            full = tp_gather(_grad(param), param, group, built.context.parallel.tp, glu=_glu(config, name))
            gname = _global(name, offset, config.share_embeddings_and_output_weights)
            diff = float((full.float() - ref_grads[gname]).abs().max())
            checked += 1
            if diff > worst:
                worst, worst_name = diff, gname
    return worst, worst_name, checked


def _logits_diff(built, batch: dict, ref_logits: torch.Tensor) -> float | None:
    """Full-vocab logits of a single-stage layout against the reference (TP gathers the vocab shards)."""
    from megatron.core import parallel_state

    if built.context.parallel.pp > 1:
        return None
    model = unwrap(built.chunks[0])
    with torch.no_grad():
        local = model(input_ids=batch["tokens"], position_ids=batch["position_ids"], attention_mask=None)
    tp = built.context.parallel.tp
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return float((torch.cat(parts, dim=-1) - ref_logits).abs().max())


def run_scenario(ref: dict, scenario: dict) -> dict:
    config = from_dict(ref["config"], PlugtronPluginManager())
    tp, pp, vp = scenario.get("tp", 1), scenario.get("pp", 1), scenario.get("vp")
    config.tensor_model_parallel_size, config.pipeline_model_parallel_size = tp, pp
    config.virtual_pipeline_model_parallel_size = vp
    parallel = initialize_parallel(tp, pp, vp, timeout_s=120)
    pm = PlugtronPluginManager()
    pm.register(LoadReference(ref["state"]), name="load-reference")
    built = build_model(config, parallel=parallel, options=BuildOptions(wrap=scenario.get("wrap", "none")), pm=pm)
    if scenario.get("force_batch_p2p"):
        unwrap(built.chunks[0]).config.batch_p2p_comm = True
    logits_diff = _logits_diff(built, ref["batches"][0], ref["logits"])
    dp, dp_rank = parallel.dp, parallel.dp_rank
    loss = forward_backward(built, ref["batches"][dp_rank::dp])
    losses: list = [None] * parallel.world_size
    dist.all_gather_object(losses, loss)
    grad_diff, worst, checked = _compare_grads(built, config, ref["grads"])
    diffs: list = [None] * parallel.world_size
    dist.all_gather_object(diffs, (grad_diff, worst, checked))
    values = [v for v in losses if v is not None]
    return {
        "name": scenario["name"],
        "loss": sum(values) / len(values),
        "ref_loss": ref["loss"],
        "max_grad_diff": max(d[0] for d in diffs),
        "worst": max(diffs)[1],
        "params_checked": sum(d[2] for d in diffs),
        "max_logits_diff": logits_diff,
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
