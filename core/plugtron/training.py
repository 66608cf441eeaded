"""One forward/backward step through megatron-core's own pipeline schedules.

Used by ``plugtron build --step`` and by the tests that compare layouts: the
same code path serves a single process and PP/VP/DP runs. The loss of a
micro-batch is the mean per-token loss; the step's loss is their mean, known
on the last pipeline stage (``None`` elsewhere).

:func:`train_step` also returns what megatron folds into the backward pass
besides the main loss: the MoE auxiliary losses (load balancing, z-loss, per
kind, mean per MoE layer and micro-batch, reduced over ranks as megatron's
logging reduces them) and the MTP loss. Mixture-of-Experts models also get,
for plain (unwrapped) chunks, what megatron's ``finalize_model_grads`` does for
DDP: the aux-loss-free expert-bias update, and the sum of expert gradients
over the expert-data-parallel group (see :func:`_sync_expert_grads`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from plugtron.pipeline import BuiltModel


@attrs.frozen
class StepResult:
    """One step's losses, on every rank.

    ``loss``: mean per-token loss of the micro-batches (last pipeline stage;
    ``None`` elsewhere). ``aux_losses``: MoE auxiliary losses by megatron's
    name (``load_balancing_loss``, ``z_loss`` ...), unscaled by their
    coefficients, mean per MoE layer and micro-batch. ``mtp_loss``: mean
    multi-token-prediction loss per MTP layer and micro-batch, or ``None``.
    """

    loss: float | None
    aux_losses: dict[str, float] = attrs.field(factory=dict)
    mtp_loss: float | None = None


def _reduce_grad(param: Any, group: Any) -> None:
    """Sum ``param.grad`` over ``group``; a missing grad takes part as zeros.

    Whether to enter the collective is the caller's decision, made on facts
    every rank of the group shares (``requires_grad``, agreed at build time);
    whether a grad exists is local (a copy that took no part in this rank's
    graph has none) and must never decide it. The summed grad is stored back,
    so every copy receives the same update.
    """
    import torch
    import torch.distributed as dist

    grad = param.grad if param.grad is not None else torch.zeros_like(param)
    # FSDP2 (a DTensor): this rank's shard; the ranks of ``group`` hold the same shard index
    # (they are one data-parallel rank's tensor-parallel peers), so summing shards sums the tensor.
    local = grad.to_local() if hasattr(grad, "to_local") else grad
    dist.all_reduce(local, group=group)
    param.grad = grad


def _sync_tied_embedding_grads(chunks: list) -> None:
    """Sum the tied embedding/output grads (or the MTP embedding's) of the first and last stage.

    DDP-wrapped chunks get this from megatron's ``finalize_model_grads``; plain
    chunks (``--wrap none``) get it here, with the same group megatron uses.
    Both copies agree on ``requires_grad`` (the pipeline's step 2b,
    :mod:`plugtron.pipeline.tied`), so every rank of the group makes the same
    choice.
    """
    from megatron.core import parallel_state

    from plugtron.pipeline.tied import tied_copy

    if parallel_state.get_pipeline_model_parallel_world_size() == 1 or not parallel_state.is_rank_in_embedding_group():
        return
    mine = tied_copy(chunks)
    if mine is not None and mine[1].requires_grad:
        _reduce_grad(mine[1], parallel_state.get_embedding_group())


def _sync_sequence_parallel_grads(chunks: list) -> None:
    """Sum, over the TP group, grads of replicated parameters that see only a rank's share.

    With sequence parallelism each TP rank sees only its slice of the
    sequence, so norm weights collect partial grads; per-head q/k norms see
    only the rank's heads at any TP > 1. megatron's ``finalize_model_grads``
    sums both for DDP-wrapped chunks (``sequence_parallel`` parameters, and
    ``q_layernorm`` / ``k_layernorm`` ones when the config has
    ``qk_layernorm``), this does the same for plain ones. Decided on
    ``requires_grad``, which TP ranks share.
    """
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return
    group = parallel_state.get_tensor_model_parallel_group()
    for chunk in chunks:
        qk_norms = bool(getattr(getattr(chunk, "config", None), "qk_layernorm", False))
        for name, param in chunk.named_parameters():
            per_head = qk_norms and ("q_layernorm" in name or "k_layernorm" in name)
            if (getattr(param, "sequence_parallel", False) or per_head) and param.requires_grad:
                _reduce_grad(param, group)


def _moe_layers(chunks: list) -> list:
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from plugtron.sharding import unwrap

    return [m for chunk in chunks for m in unwrap(chunk).modules() if isinstance(m, MoELayer)]


def _sync_expert_grads(chunks: list) -> None:
    """Sum expert grads over the expert-data-parallel group (plain chunks, no data parallelism).

    With sequence parallelism each tensor-parallel rank routes its own slice
    of the tokens. When experts are sharded over fewer ranks than attention
    (expert_tensor x expert_model parallel < tensor parallel, e.g. TP=2,
    ETP=1, EP=1), several TP ranks hold the same expert shard and each has
    only its tokens' share of the gradient: megatron's expert-data-parallel
    group is exactly those ranks (times the data-parallel replicas, of which
    there are none for plain chunks at dp=1; with dp > 1 plain chunks get no
    data-parallel reduction at all, as dense parameters do not). Experts that
    FSDP2 manages were reduced over that group by FSDP2 itself.
    """
    from megatron.core import parallel_state
    from torch.distributed.fsdp import FSDPModule

    if parallel_state.get_data_parallel_world_size() > 1:
        return
    group = parallel_state.get_expert_data_parallel_group()
    if group.size() == 1:
        return
    for layer in _moe_layers(chunks):
        if isinstance(layer.experts, FSDPModule):
            continue
        for param in layer.experts.parameters():
            if param.requires_grad:
                _reduce_grad(param, group)


def update_expert_bias(chunks: list, config: Any) -> None:
    """The aux-loss-free expert-bias update megatron's ``finalize_model_grads`` makes, for plain chunks.

    Token counts are summed over the tensor x data-parallel group inside
    megatron's ``get_updated_expert_bias`` (every rank of a pipeline stage
    holds the same MoE layers, so all of them enter it together), then reset.
    """
    import torch
    from megatron.core.transformer.moe.moe_utils import get_updated_expert_bias

    routers = [layer.router for layer in _moe_layers(chunks) if getattr(layer.router, "expert_bias", None) is not None]
    if not config.moe_router_enable_expert_bias or not routers:
        return
    counts = torch.stack([r.local_tokens_per_expert for r in routers])
    updated = get_updated_expert_bias(counts, torch.stack([r.expert_bias for r in routers]), config.moe_router_bias_update_rate)
    for router, bias in zip(routers, updated):
        router.expert_bias.copy_(bias)
        router.local_tokens_per_expert.zero_()


def _moe_aux_losses(config: Any, num_microbatches: int) -> dict[str, float]:
    """megatron's aux-loss tracker reduced over ranks, per kind: mean per MoE layer and micro-batch; then cleared.

    Every rank must call it (collectives over the pipeline, tensor and data
    groups); kinds a rank never recorded (a stage without MoE layers) enter
    as zeros, as megatron's own logging does.
    """
    import torch
    import torch.distributed as dist
    from megatron.core.transformer.moe import moe_utils

    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    names: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(names, sorted(tracker))
    layers = config.num_layers + (config.mtp_num_layers or 0)
    for name in sorted(set().union(*names)):
        if name not in tracker:
            tracker[name] = {"values": torch.zeros(layers), "reduce_group": None, "avg_group": None, "reduce_group_has_dp": False}
    moe_utils.reduce_aux_losses_tracker_across_ranks(sorted(tracker))
    # Kinds megatron records without any group (z_loss) hold this rank's mean over its own
    # tokens; every rank of a stage has as many, so their mean is the mean over all tokens.
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
    for name in sorted(tracker):
        entry = tracker[name]
        if entry.get("reduce_group") is None and entry.get("avg_group") is None and group.size() > 1:
            dist.all_reduce(entry["values"], group=group, op=dist.ReduceOp.AVG)
    moe_layers = sum(_moe_pattern(config)) + (config.mtp_num_layers or 0)
    losses = {name: float(entry["values"].sum()) / moe_layers / num_microbatches for name, entry in sorted(tracker.items())}
    moe_utils.clear_aux_losses_tracker()
    return losses


def _moe_pattern(config: Any) -> list[int]:
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return [1 if i % freq == 0 else 0 for i in range(config.num_layers)]
    return list(freq)


def _mtp_loss(builder: Any, num_microbatches: int) -> float | None:
    """Mean MTP loss per MTP layer and micro-batch, from the ranks that recorded it (a collective)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    read = getattr(builder, "mtp_losses", None)
    values = read(reset=True) if read is not None else None
    mine = torch.zeros(2, dtype=torch.float64)
    if values is not None and parallel_state.get_tensor_model_parallel_rank() == 0 and float(values.abs().sum()) > 0:
        mine[0], mine[1] = float(values.mean()), num_microbatches  # TP ranks hold the same value: count it once
    dist.all_reduce(mine)
    return None if mine[1] == 0 else float(mine[0] / mine[1])


def train_step(built: "BuiltModel", batches: list[dict[str, Any]], *, forward_only: bool = False) -> StepResult:
    """:func:`forward_backward` with the MoE auxiliary and MTP losses of the step (every rank calls it)."""
    if getattr(built.context.builder.config, "num_moe_experts", None):
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        get_moe_layer_wise_logging_tracker().clear()  # only this model's kinds (the tracker is process-wide)
    read_mtp = getattr(built.context.builder, "mtp_losses", None)
    if read_mtp is not None and getattr(built.context.builder.config, "mtp_num_layers", None):
        read_mtp(reset=True)  # megatron's MTP record is process-wide too: start this step from zero
    loss = forward_backward(built, batches, forward_only=forward_only, _keep_trackers=True)
    return _step_losses(built, loss, len(batches))


def _step_losses(built: "BuiltModel", loss: float | None, num_microbatches: int) -> StepResult:
    config = built.context.builder.config
    aux = _moe_aux_losses(config, num_microbatches) if getattr(config, "num_moe_experts", None) else {}
    mtp = _mtp_loss(built.context.builder, num_microbatches) if getattr(config, "mtp_num_layers", None) else None
    return StepResult(loss=loss, aux_losses=aux, mtp_loss=mtp)


def forward_backward(
    built: "BuiltModel", batches: list[dict[str, Any]], *, forward_only: bool = False, _keep_trackers: bool = False
) -> float | None:
    """Run ``len(batches)`` micro-batches; gradients accumulate in the chunks (DDP: in main_grad).

    Returns the main loss only; :func:`train_step` also returns the MoE and MTP losses.
    """
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    builder = built.context.builder
    chunks = built.chunks
    first = batches[0]
    micro_batch_size, seq_length = first["tokens"].shape

    def forward_step(data_iterator: Any, model: Any) -> Any:
        output = builder.forward_step(model, next(data_iterator))

        def loss_func(output_tensor: torch.Tensor) -> Any:
            loss = output_tensor.float().mean()
            # megatron divides the returned loss in place: log a copy
            return loss, {"loss": loss.detach().clone()}

        return output, loss_func

    wrapped = hasattr(chunks[0], "finish_grad_sync")
    config = chunks[0].config
    if wrapped:
        from megatron.core.distributed import finalize_model_grads

        config.finalize_model_grads_func = finalize_model_grads  # DP reduce + tied embeddings
        for chunk in chunks:
            chunk.zero_grad_buffer()
    iterators = [iter(batches) for _ in chunks]
    results = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    if not wrapped and not forward_only:
        _sync_tied_embedding_grads(chunks)
        _sync_sequence_parallel_grads(chunks)
        if getattr(config, "num_moe_experts", None):
            _sync_expert_grads(chunks)
            update_expert_bias(chunks, config)
    loss = float(torch.stack([r["loss"] for r in results]).mean()) if results else None
    if not _keep_trackers and getattr(config, "num_moe_experts", None):
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        clear_aux_losses_tracker()  # the aux-loss record is per step (megatron clears it when logging)
    return loss


def random_batches(built: "BuiltModel", count: int, batch_size: int, seq_length: int, seed: int = 0) -> list[dict[str, Any]]:
    builder = built.context.builder
    return [builder.random_batch(batch_size, seq_length, seed=seed + i) for i in range(count)]
