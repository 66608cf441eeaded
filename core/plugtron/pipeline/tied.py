"""Steps 2b and 8b: the two copies of a tied embedding agree on ``requires_grad``.

With ``share_embeddings_and_output_weights`` and pipeline parallelism the
word embedding lives twice: ``embedding.word_embeddings.weight`` on the first
stage and ``output_layer.weight`` on the last. megatron keeps them equal by
summing their grads over the embedding group after every backward, and both
that all-reduce and megatron DDP's buckets are decided by ``requires_grad``.
A pre-wrap hook only sees its own rank's chunks, so the natural "freeze the
embedding" hook (the ``plugtron_pre_wrap`` docstring's example) freezes one
copy: one rank then enters the all-reduce and the other does not, and the step
hangs until the process-group timeout.

Decision: a freeze of either copy is propagated to the other, with a one-line
warning naming both. The tied weight is one logical parameter that megatron
stores twice; a hook cannot reach the other stage's copy, and "freeze the
embedding" can only mean freezing that one weight (training the other copy
would make the two copies diverge, which tying forbids). Freezing is the only
direction that carries intent: ``requires_grad=True`` is the default, not a
decision, so ``False`` wins. Refusing instead would make the documented hook
example an error at PP > 1 while it works at PP = 1.

The agreement runs after the pre-wrap hooks and before placement, mixed
precision and DDP wrapping (DDP builds its grad buckets from
``requires_grad``), and again after the post-wrap hooks. Whether a rank takes
part is decided by rank-consistent facts only (pipeline size, membership of
megatron's embedding group); the flags themselves travel in one small
``all_gather`` over that group. A training loop that changes freezing later
calls :func:`agree_tied_embeddings` again, on every rank of the group.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class TiedWeightFreezeWarning(UserWarning):
    """One copy of a tied weight was frozen; the freeze was applied to every copy."""


def tied_copy(chunks: list) -> "tuple[str, torch.nn.Parameter] | None":
    """This rank's copy of the tied embedding as (local name, parameter), if it holds one.

    The first stage holds it in its first chunk, the last stage in its last
    chunk (megatron's own rule in ``finalize_model_grads``). Untied models with
    multi-token prediction hold the word embedding twice in the same way.
    """
    return _shared_output_copy(chunks) or _mtp_embedding_copy(chunks)


def _shared_output_copy(chunks: list) -> "tuple[str, torch.nn.Parameter] | None":
    from plugtron.sharding import unwrap

    first, last = unwrap(chunks[0]), unwrap(chunks[-1])
    holder = first if getattr(first, "pre_process", False) else last
    if not getattr(holder, "share_embeddings_and_output_weights", False):
        return None
    weight = holder.shared_embedding_or_output_weight()
    if weight is None:
        return None
    name = next((n for n, p in holder.named_parameters() if p is weight), "shared_embedding_or_output_weight")
    return name, weight


def _mtp_embedding_copy(chunks: list) -> "tuple[str, Any] | None":
    """The word embedding a multi-token-prediction block reuses, on the first and on the last stage.

    Untied models with MTP hold the embedding twice under pipeline parallelism
    (the last stage embeds the shifted tokens for MTP); megatron sums the two
    grads like a tied embedding's (``finalize_model_grads``), so plain chunks do too.
    Both stages hold a copy exactly when ``mtp_num_layers`` is set, so they agree on entering.
    """
    from plugtron.sharding import unwrap

    first, last = unwrap(chunks[0]), unwrap(chunks[-1])
    if not getattr(first.config, "mtp_num_layers", None):
        return None
    holder = first if getattr(first, "pre_process", False) else last
    if not (getattr(holder, "pre_process", False) or getattr(holder, "mtp_process", False)):
        return None
    return "embedding.word_embeddings.weight", holder.embedding.word_embeddings.weight


def _in_embedding_group() -> bool:
    """Rank-consistent: every member of the group gets the same answer for the group."""
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_world_size() > 1 and parallel_state.is_rank_in_embedding_group()


def _gather_flags(entry: tuple | None) -> list:
    """(pp rank, name, requires_grad) of every rank in this rank's embedding group."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    group = parallel_state.get_embedding_group()
    gathered: list[Any] = [None] * dist.get_world_size(group=group)
    dist.all_gather_object(gathered, entry, group=group)
    return gathered


def agree_tied_embeddings(chunks: list) -> None:
    """Make every copy of a tied embedding frozen if any copy is; warn once per copy changed.

    Every rank of the embedding group must call this (it is one collective);
    ranks outside it return at once.
    """
    from megatron.core import parallel_state

    if not _in_embedding_group():
        return
    mine = tied_copy(chunks)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    entry = None if mine is None else (pp_rank, mine[0], bool(mine[1].requires_grad))
    copies = [e for e in _gather_flags(entry) if e is not None]
    frozen = [e for e in copies if not e[2]]
    if mine is None or not frozen or not mine[1].requires_grad:
        return
    mine[1].requires_grad_(False)
    by = ", ".join(f"{name} (pipeline stage {rank})" for rank, name, _ in frozen)
    warnings.warn(
        f"plugtron: tied weight {mine[0]} (pipeline stage {pp_rank}) frozen because its other copy {by} was frozen",
        TiedWeightFreezeWarning,
        stacklevel=2,
    )
