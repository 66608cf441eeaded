"""Step 1: one model chunk per virtual-pipeline stage of this rank."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch

    from plugtron.builder import ModelBuilder
    from plugtron.runtime.parallel import ParallelContext


def stage_flags(vp_stage: int | None) -> tuple[bool, bool]:
    """(pre_process, post_process) of this rank for a virtual stage."""
    from megatron.core import parallel_state

    ignore_virtual = vp_stage is None
    return (
        parallel_state.is_pipeline_first_stage(ignore_virtual=ignore_virtual, vp_stage=vp_stage),
        parallel_state.is_pipeline_last_stage(ignore_virtual=ignore_virtual, vp_stage=vp_stage),
    )


def build_stages(builder: "ModelBuilder", parallel: "ParallelContext", *, meta: bool) -> "list[torch.nn.Module]":
    import torch

    vp_stages: list[int | None] = list(range(parallel.vp)) if parallel.vp else [None]
    chunks = []
    device_ctx = torch.device("meta") if meta else contextlib.nullcontext()
    with _without_random_init(builder.config) if meta else contextlib.nullcontext():
        for vp_stage in vp_stages:
            pre, post = stage_flags(vp_stage)
            with device_ctx:
                chunk = builder.build_stage(
                    pre_process=pre, post_process=post, vp_stage=vp_stage, pg_collection=parallel.pg_collection
                )
            chunk.model_type = getattr(chunk, "model_type", None) or _encoder_or_decoder()
            chunks.append(chunk)
    return chunks


_INIT_FIELDS = ("init_method", "output_layer_init_method", "embedding_init_method")


def _no_init(tensor: "torch.Tensor") -> None:
    """Stands in for megatron's init methods while constructing on the meta device."""


@contextlib.contextmanager
def _without_random_init(config: object) -> "Iterator[None]":
    """Construct without drawing random numbers into meta tensors.

    Meta tensors hold no values, yet megatron still runs its init methods on
    them (a full-size master weight, ``normal_``, split, cat: every call a
    Python decomposition); measured, that was half of a 246M model's meta
    construction. The init *callables* are swapped for a no-op (unlike
    ``perform_initialization=False``, this keeps the tensor-parallel attributes
    megatron sets in the same code path); materialisation initialises or loads
    every parameter afterwards. megatron-core's modules read these fields at
    construction and do not keep them, so restoring the fields restores all.
    """
    transformer = getattr(config, "transformer", None)
    saved = {name: getattr(transformer, name) for name in _INIT_FIELDS if hasattr(transformer, name)}
    try:
        for name in saved:
            setattr(transformer, name, _no_init)
        yield
    finally:
        for name, value in saved.items():
            setattr(transformer, name, value)


def _encoder_or_decoder():  # megatron's schedules read model_type on every chunk
    from megatron.core.enums import ModelType

    return ModelType.encoder_or_decoder


def set_tensor_parallel_defaults(chunks: "list[torch.nn.Module]") -> None:
    """Step 3: every parameter gets megatron's TP attributes (replicated by default)."""
    from megatron.core import tensor_parallel

    for chunk in chunks:
        for param in chunk.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
