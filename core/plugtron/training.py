"""One forward/backward step through megatron-core's own pipeline schedules.

Used by ``plugtron build --step`` and by the tests that compare layouts: the
same code path serves a single process and PP/VP/DP runs. The loss of a
micro-batch is the mean per-token loss; the step's loss is their mean, known
on the last pipeline stage (``None`` elsewhere).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from plugtron.pipeline import BuiltModel


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
    dist.all_reduce(grad, group=group)
    param.grad = grad


def _sync_tied_embedding_grads(chunks: list) -> None:
    """Sum the tied embedding/output grads of the first and last stage.

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
    """Sum, over the TP group, grads of parameters replicated under sequence parallelism.

    With sequence parallelism each TP rank sees only its slice of the
    sequence, so norm weights collect partial grads; megatron's
    ``finalize_model_grads`` sums them for DDP-wrapped chunks, this does it
    for plain ones. Decided on ``requires_grad``, which TP ranks share.
    """
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return
    group = parallel_state.get_tensor_model_parallel_group()
    for chunk in chunks:
        for param in chunk.parameters():
            if getattr(param, "sequence_parallel", False) and param.requires_grad:
                _reduce_grad(param, group)


def forward_backward(built: "BuiltModel", batches: list[dict[str, Any]], *, forward_only: bool = False) -> float | None:
    """Run ``len(batches)`` micro-batches; gradients accumulate in the chunks (DDP: in main_grad)."""
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
    if not results:
        return None
    return float(torch.stack([r["loss"] for r in results]).mean())


def random_batches(built: "BuiltModel", count: int, batch_size: int, seq_length: int, seed: int = 0) -> list[dict[str, Any]]:
    builder = built.context.builder
    return [builder.random_batch(batch_size, seq_length, seed=seed + i) for i in range(count)]
