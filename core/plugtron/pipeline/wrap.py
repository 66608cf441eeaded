"""Steps 5 and 7: the mixed-precision wrapper and data-parallel wrapping."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from plugtron.errors import PipelineError

if TYPE_CHECKING:
    import torch

    from plugtron.builder import BuildContext


def wants_half(config: Any) -> bool:
    return bool(getattr(config, "bf16", False) or getattr(config, "fp16", False))


def apply_mixed_precision(chunks: list, config: Any, context: "BuildContext") -> list:
    """megatron's Float16Module around each chunk when the config asks for bf16/fp16.

    FSDP2 casts through its own MixedPrecisionPolicy instead.
    """
    if context.options.mixed_precision == "none" or context.options.wrap == "fsdp2" or not wants_half(config):
        return chunks
    from megatron.core.transformer.module import Float16Module

    return [Float16Module(config.transformer, chunk) for chunk in chunks]


def wrap_data_parallel(chunks: list, config: Any, context: "BuildContext") -> list:
    kind = context.options.wrap
    if kind == "none":
        return chunks
    if kind == "ddp":
        return _megatron_ddp(chunks, config, context)
    if kind == "fsdp2":
        return [_fsdp2(chunk, config, context) for chunk in chunks]
    if kind == "megatron_fsdp":
        return _megatron_fsdp(chunks, config, context)
    raise PipelineError(f"unknown wrap '{kind}'")


def _ddp_config(context: "BuildContext", **extra: Any) -> Any:
    from megatron.core.distributed import DistributedDataParallelConfig

    try:
        return DistributedDataParallelConfig(**{**context.options.ddp_config, **extra})
    except TypeError as exc:
        raise PipelineError(f"build option ddp_config: {exc}") from exc


def _megatron_ddp(chunks: list, config: Any, context: "BuildContext") -> list:
    from megatron.core.distributed import DistributedDataParallel

    ddp_config = _ddp_config(context)
    wrapped = [
        DistributedDataParallel(
            config=config.transformer,
            ddp_config=ddp_config,
            module=chunk,
            # Only the first chunk's buckets overlap with compute (megatron's rule).
            disable_bucketing=index > 0,
            pg_collection=context.parallel.pg_collection,
        )
        for index, chunk in enumerate(chunks)
    ]
    if context.options.broadcast_params:
        for chunk in wrapped:
            chunk.broadcast_params()
    return wrapped


def _fsdp2(chunk: "torch.nn.Module", config: Any, context: "BuildContext") -> "torch.nn.Module":
    """torch ``fully_shard`` on every layer the builder names, then the chunk.

    Only whole layers become units: giving the (possibly tied) embedding its
    own unit breaks weight sharing.
    """
    import torch
    from megatron.core import parallel_state
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = DeviceMesh.from_group(parallel_state.get_data_parallel_group(), device_type=context.device)
    policy = None
    if wants_half(config) and context.options.mixed_precision != "none":
        half = torch.bfloat16 if getattr(config, "bf16", False) else torch.float16
        policy = MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32)
    kwargs = {"mesh": mesh, **({"mp_policy": policy} if policy else {})}
    unit_types = context.builder.fsdp_unit_types()
    for module in list(chunk.modules()):
        if isinstance(module, unit_types):
            fully_shard(module, **kwargs)
    fully_shard(chunk, **kwargs)
    if context.options.broadcast_params:
        raise PipelineError("broadcast_params is for ddp; FSDP2 shards come from one initialisation already")
    return chunk


def _megatron_fsdp(chunks: list, config: Any, context: "BuildContext") -> list:
    """megatron-core's own FSDP. Written against its API; not run on a GPU by this project yet."""
    if context.device != "cuda":
        raise PipelineError(
            "wrap 'megatron_fsdp' needs CUDA (megatron-core builds its device mesh on 'cuda'); "
            "use wrap 'fsdp2' on CPU"
        )
    from megatron.core.distributed import FullyShardedDataParallel

    ddp_config = _ddp_config(context, use_megatron_fsdp=True)
    return [
        FullyShardedDataParallel(config=config.transformer, ddp_config=ddp_config, module=chunk, pg_collection=context.parallel.pg_collection)
        for chunk in chunks
    ]
