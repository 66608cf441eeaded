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
    with _without_random_init(builder.config) if meta else contextlib.nullcontext(), _without_master_weights(meta), \
            _without_cyclic_gc(meta):
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


@contextlib.contextmanager
def _without_cyclic_gc(meta: bool) -> "Iterator[None]":
    """No cyclic garbage collection while constructing on the meta device.

    A frontier MoE shape is ~47k modules and ~60k parameters, each a handful
    of container objects and none of them garbage: Python's generational
    collector keeps re-scanning the growing heap for cycles it will not find.
    Measured on a DeepSeek-V3 shape: 5.0 s -> 3.4 s; Qwen3-235B-A22B: 3.2 s ->
    1.7 s. The collector's previous state is restored afterwards, and cycles
    made meanwhile are collected at its next run.
    """
    import gc

    enabled = meta and gc.isenabled()
    if enabled:
        gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


#: megatron modules that call ``_initialize_affine_weight_cpu`` through a name of their own.
_AFFINE_INIT_USERS = (
    "megatron.core.tensor_parallel.layers",
    "megatron.core.transformer.moe.experts",
    "megatron.core.extensions.transformer_engine",
)


@contextlib.contextmanager
def _without_master_weights(meta: bool) -> "Iterator[None]":
    """Under a meta build, megatron's CPU weight initialisation only marks the tensor-parallel attributes.

    With ``use_cpu_initialization`` every megatron linear and embedding builds
    a full-size master weight, initialises it, splits it, concatenates this
    rank's slices and copies them into the parameter (``_initialize_affine_weight_cpu``).
    On the meta device that is all shape arithmetic through torch's Python
    reference decompositions: measured under cProfile, 9.8 of the 16.3 s of
    constructing a DeepSeek-V3 shape (30k linears; 6.9 s in ``torch.cat``). Materialisation
    initialises every parameter afterwards, so only the attributes that
    function sets (``tensor_model_parallel``, ``partition_dim``,
    ``partition_stride``) are kept; a caller that asks for the master weight
    back (megatron's tests) gets the original function.
    """
    import sys

    if not meta:
        yield
        return
    from megatron.core.tensor_parallel import layers

    original = layers._initialize_affine_weight_cpu

    def mark_only(weight: "torch.Tensor", output_size: int, input_size: int, per_partition_size: int, partition_dim: int,
                  init_method: object, stride: int = 1, return_master_weight: bool = False, **kwargs: object) -> object:
        if return_master_weight:
            return original(weight, output_size, input_size, per_partition_size, partition_dim, init_method,
                            stride, return_master_weight, **kwargs)
        if not kwargs.get("skip_set_tensor_parallel_attributes", False):
            layers.set_tensor_model_parallel_attributes(tensor=weight, is_parallel=True, dim=partition_dim, stride=stride)
        return None

    users = [sys.modules[name] for name in _AFFINE_INIT_USERS if name in sys.modules]
    saved = [(module, module.__dict__.get("_initialize_affine_weight_cpu")) for module in users]
    try:
        for module, found in saved:
            if found is original:
                module._initialize_affine_weight_cpu = mark_only
        yield
    finally:
        for module, found in saved:
            if found is original:
                module._initialize_affine_weight_cpu = original


def _encoder_or_decoder():  # megatron's schedules read model_type on every chunk
    from megatron.core.enums import ModelType

    return ModelType.encoder_or_decoder


def set_tensor_parallel_defaults(chunks: "list[torch.nn.Module]") -> None:
    """Step 3: every parameter gets megatron's TP attributes (replicated by default)."""
    from megatron.core import tensor_parallel

    for chunk in chunks:
        for param in chunk.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
