"""Layout parity: same weights and data in another TP/PP/VP/DP layout, same numbers.

For family authors and for plugtron's own tests. :func:`reference` runs a
config in one process (logits, loss, gradients); :func:`run` starts one
multi-rank job (:mod:`plugtron.runtime.launcher`) that rebuilds it in every scenario's layout, loads the reference
weights into each rank's slices through a pre-wrap hook (so wrapping sees
them), runs megatron's schedules, and gathers logits and gradients back to
full tensors under their global names. The family's tensor-parallel layout
comes from its builder (:meth:`plugtron.builder.ModelBuilder.tp_row_blocks`).

A scenario is a dict: ``name``, ``ref`` (a key of the references), and any of
``tp``, ``pp``, ``vp``, ``ep`` / ``etp`` (expert model / tensor parallel),
``sp`` (sequence parallel; left unset, the config decides), ``wrap``,
``checkpoint_keys`` (also compare distributed-checkpoint keys),
``batch_p2p_comm`` (force megatron's setting, e.g. to show the gloo trap) and
``setup``: an import path ``module:function`` (test code, never file data)
called as ``function(config)`` in every rank before the build; it may change
the config or patch code to reproduce a known-wrong construction and returns
a function that undoes it (or ``None``).

Mixture-of-Experts models are compared expert by expert under their global
names (expert-parallel ranks hold different experts, split over the expert
tensor-parallel group), and also on the step's auxiliary losses and the
aux-loss-free expert bias after its update.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from plugtron import hookimpl

TIED = "embedding.word_embeddings.weight"


def reference(config: Any, *, micro_batches: int = 4, batch_size: int = 2, seq_length: int = 16, pm: Any = None) -> dict:
    """Single-process run of ``config`` (TP = PP = 1) on fixed random micro-batches."""
    import torch

    from plugtron.config import to_dict
    from plugtron.manager import PlugtronPluginManager
    from plugtron.pipeline import build_model
    from plugtron.runtime.parallel import initialize_parallel
    from plugtron.training import train_step

    saved = to_dict(config)
    built = build_model(config, parallel=initialize_parallel(), pm=pm or PlugtronPluginManager())
    model, builder = built.chunks[0], built.context.builder
    batches = [builder.random_batch(batch_size, seq_length, seed=10 + i) for i in range(micro_batches)]
    with torch.no_grad():
        logits = [builder.forward_step(model, dict(batch, labels=None)).clone() for batch in batches]
    step = train_step(built, batches)
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return {
        "config": saved, "state": state, "grads": grads, "loss": step.loss, "batches": batches, "logits": logits,
        "aux_losses": step.aux_losses, "mtp_loss": step.mtp_loss, "expert_bias": _expert_biases(built.chunks, config),
    }


def run(references: dict[str, dict], scenarios: list[dict], workdir: Path, *, nproc: int = 2, timeout_s: float = 600) -> dict[str, dict]:
    """Run every scenario in one multi-rank job; results keyed by scenario name."""
    import torch

    from plugtron.runtime.launcher import launch

    workdir.mkdir(parents=True, exist_ok=True)
    torch.save(references, workdir / "references.pt")
    out = workdir / "results.json"
    argv = ["--ref", str(workdir / "references.pt"), "--scenarios", json.dumps(scenarios), "--out", str(out)]
    code = launch(nproc, "plugtron.parity", argv, timeout_s=timeout_s, logs=workdir)
    if code != 0:
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(workdir.glob("rank*.log")))
        raise RuntimeError(f"layout parity job failed (exit {code}):\n{logs}")
    return {r["name"]: r for r in json.loads(out.read_text())}


# -- inside the torchrun job -----------------------------------------------------
def _named(chunks: list, config: Any, named: str):
    """(global name, tensor) of every parameter or buffer (``named``) on this rank; a tied output layer as TIED."""
    from plugtron.sharding import layer_offset, model_global_name, unwrap

    tied = config.share_embeddings_and_output_weights
    for chunk in chunks:
        offset = layer_offset(chunk)
        for name, tensor in getattr(unwrap(chunk), named)():
            gname = model_global_name(name, offset, config)
            yield (TIED if tied and gname == "output_layer.weight" else gname), tensor


def _params(chunks: list, builder: Any, config: Any):
    """(global name, parameter, row blocks) of every parameter on this rank."""
    for gname, param in _named(chunks, config, "named_parameters"):
        yield gname, param, builder.tp_row_blocks(gname, param)


def _expert_biases(chunks: list, config: Any) -> dict:
    """The routers' aux-loss-free expert biases (buffers) under global names."""
    return {n: b.detach().clone() for n, b in _named(chunks, config, "named_buffers") if n.endswith("router.expert_bias")}


class _LoadReference:
    """A plugin whose pre-wrap hook copies the reference weights into each rank's slices."""

    def __init__(self, state: dict) -> None:
        self.state = state

    @hookimpl
    def plugtron_pre_wrap(self, model: list, config: Any, context: Any) -> None:
        import torch

        from plugtron.sharding import shard_group, tp_slice

        for gname, param, blocks in _params(model, context.builder, config):
            _, size, rank = shard_group(gname)
            with torch.no_grad():
                param.copy_(tp_slice(self.state[gname], param, rank, size, blocks=blocks))


def _collect_logits(built: Any, batches: list) -> list:
    """Logits of every micro-batch through megatron's schedules (forward only, no grad; last stage only).

    Without grad, MoE routers record nothing (token counts for the expert
    bias, aux losses), as in the reference's logits pass.
    """
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    builder, chunks = built.context.builder, built.chunks

    def step(iterator: Any, model: Any) -> Any:
        output = builder.forward_step(model, dict(next(iterator), labels=None))
        return output, lambda out: (out.float().sum() * 0.0, {"logits": out.detach().clone()})

    iterators = [iter(batches) for _ in chunks]
    with torch.no_grad():
        results = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iterators if len(chunks) > 1 else iterators[0],
            model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=len(batches),
            seq_length=batches[0]["tokens"].shape[1], micro_batch_size=batches[0]["tokens"].shape[0], forward_only=True,
        )
    return [r["logits"] for r in results or []]


def _logits_diff(local: list, expected: list, tp: int) -> float | None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not local:
        return None
    group, worst = parallel_state.get_tensor_model_parallel_group(), 0.0
    for mine, ref in zip(local, expected):
        parts = [torch.empty_like(mine) for _ in range(tp)]
        dist.all_gather(parts, mine.contiguous(), group=group)
        worst = max(worst, float((torch.cat(parts, dim=-1) - ref).abs().max()))
    return worst


def _grad_diff(built: Any, config: Any, ref_grads: dict) -> tuple[float, str, int]:
    from plugtron.sharding import shard_group, tp_gather

    worst, worst_name, checked = 0.0, "", 0
    for gname, param, blocks in _params(built.chunks, built.context.builder, config):
        group, size, _ = shard_group(gname)
        grad = param.main_grad if hasattr(param, "main_grad") else param.grad  # DDP keeps it in main_grad
        grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad  # FSDP2 DTensor
        diff = float((tp_gather(grad, param, group, size, blocks=blocks).float() - ref_grads[gname]).abs().max())
        checked += 1
        if diff > worst:
            worst, worst_name = diff, gname
    return worst, worst_name, checked


def _checkpoint_keys(built: Any) -> set[str]:
    from plugtron.sharding import unwrap

    keys = set()
    for chunk in built.chunks:
        for value in unwrap(chunk).sharded_state_dict().values():
            key = getattr(value, "key", None)
            if key is not None and not key.endswith("_extra_state"):
                keys.add(key)
    return keys


def _dict_diff(mine: dict, expected: dict, *, same_keys: bool = False) -> float | None:
    """Largest difference between the entries (tensors or floats) of ``mine`` and ``expected``.

    ``None`` when both are empty; infinite when ``mine`` has a key ``expected``
    lacks, or (``same_keys``) the other way round.
    """
    import torch

    if not mine and not expected:
        return None
    if set(mine) - set(expected) or (same_keys and set(expected) - set(mine)):
        return float("inf")
    return max((float(torch.as_tensor(v).sub(torch.as_tensor(expected[k])).abs().max()) for k, v in mine.items()), default=0.0)


def run_scenario(ref: dict, scenario: dict) -> dict:
    from plugtron.config import from_dict
    from plugtron.manager import PlugtronPluginManager
    from plugtron.records import resolve

    if "setup" not in scenario:
        return _run_scenario(ref, scenario)
    config = from_dict(ref["config"], PlugtronPluginManager())
    undo = resolve(scenario["setup"])(config)  # test code the test names, never file data
    try:
        return _run_scenario(ref, scenario, config)
    finally:
        if undo is not None:
            undo()


def _run_scenario(ref: dict, scenario: dict, config: Any = None) -> dict:
    import torch.distributed as dist

    from plugtron.builder import BuildOptions
    from plugtron.config import from_dict
    from plugtron.manager import PlugtronPluginManager
    from plugtron.pipeline import build_model
    from plugtron.runtime.parallel import initialize_parallel, live_process_groups
    from plugtron.sharding import unwrap
    from plugtron.training import train_step

    pm = PlugtronPluginManager()
    config = config if config is not None else from_dict(ref["config"], pm)
    tp, pp, vp = scenario.get("tp", 1), scenario.get("pp", 1), scenario.get("vp")
    ep, etp = scenario.get("ep", 1), scenario.get("etp")
    config.tensor_model_parallel_size, config.pipeline_model_parallel_size = tp, pp
    config.virtual_pipeline_model_parallel_size = vp
    if "sp" in scenario:
        config.sequence_parallel = bool(scenario["sp"])
    if "ep" in scenario:
        config.expert_model_parallel_size = ep
    if etp is not None:
        config.expert_tensor_parallel_size = etp
    parallel = initialize_parallel(tp, pp, vp, ep=ep, etp=etp, timeout_s=120)
    groups = len(live_process_groups())
    pm.register(_LoadReference(ref["state"]), name="load-reference")
    options = BuildOptions(wrap=scenario.get("wrap", "none"), print_report=False)
    built = build_model(config, parallel=parallel, options=options, pm=pm)
    if "batch_p2p_comm" in scenario:
        unwrap(built.chunks[0]).config.batch_p2p_comm = scenario["batch_p2p_comm"]
    logits = _logits_diff(_collect_logits(built, ref["batches"]), ref["logits"], tp) if parallel.dp == 1 else None
    step = train_step(built, ref["batches"][parallel.dp_rank :: parallel.dp])
    loss = step.loss
    worst, worst_name, checked = _grad_diff(built, config, ref["grads"])
    keys = _checkpoint_keys(built) if scenario.get("checkpoint_keys") else set()
    bias = _dict_diff(_expert_biases(built.chunks, config), ref.get("expert_bias", {}))
    gathered: list = [None] * parallel.world_size
    dist.all_gather_object(gathered, (loss, logits, worst, worst_name, checked, keys, bias))
    losses = [g[0] for g in gathered if g[0] is not None]
    logit_diffs = [g[1] for g in gathered if g[1] is not None]
    return {
        "name": scenario["name"],
        "loss": sum(losses) / len(losses),
        "ref_loss": ref["loss"],
        "max_logits_diff": max(logit_diffs) if logit_diffs else None,
        "max_grad_diff": max(g[2] for g in gathered),
        "worst": max(gathered, key=lambda g: g[2])[3],
        "params_checked": sum(g[4] for g in gathered),
        "checkpoint_keys_match": set().union(*(g[5] for g in gathered)) == set(ref["state"]),
        "process_groups": groups,  # rank 0's, right after initialising this layout
        "max_aux_loss_diff": _dict_diff(step.aux_losses, ref.get("aux_losses", {}), same_keys=True),
        "aux_losses": step.aux_losses,
        "mtp_loss_diff": None if step.mtp_loss is None or ref.get("mtp_loss") is None else abs(step.mtp_loss - ref["mtp_loss"]),
        "max_expert_bias_diff": max((g[6] for g in gathered if g[6] is not None), default=None),
    }


def main() -> int:
    import warnings

    import torch
    import torch.distributed as dist

    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description="layout parity worker (run under torchrun)")
    parser.add_argument("--ref", required=True)
    parser.add_argument("--scenarios", required=True, help="JSON list of scenarios")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    refs = torch.load(args.ref, weights_only=False)
    results = [run_scenario(refs[s["ref"]], s) for s in json.loads(args.scenarios)]
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results, indent=2))
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
