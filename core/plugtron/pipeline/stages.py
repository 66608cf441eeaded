"""Step 1: one model chunk per virtual-pipeline stage of this rank."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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
    for vp_stage in vp_stages:
        pre, post = stage_flags(vp_stage)
        with device_ctx:
            chunk = builder.build_stage(
                pre_process=pre, post_process=post, vp_stage=vp_stage, pg_collection=parallel.pg_collection
            )
        chunk.model_type = getattr(chunk, "model_type", None) or _encoder_or_decoder()
        chunks.append(chunk)
    return chunks


def _encoder_or_decoder():  # megatron's schedules read model_type on every chunk
    from megatron.core.enums import ModelType

    return ModelType.encoder_or_decoder


def set_tensor_parallel_defaults(chunks: "list[torch.nn.Module]") -> None:
    """Step 3: every parameter gets megatron's TP attributes (replicated by default)."""
    from megatron.core import tensor_parallel

    for chunk in chunks:
        for param in chunk.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
