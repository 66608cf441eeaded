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

    wrapped = [Float16Module(config.transformer, chunk) for chunk in chunks]
    for chunk in wrapped:
        keep_expert_bias_float32(chunk)
    return wrapped


def keep_expert_bias_float32(chunk: "torch.nn.Module") -> None:
    """MoE routers' ``expert_bias`` buffers back to float32 after the half-precision cast.

    Float16Module casts every buffer; megatron restores the bias to float32
    only at the first forward, after the values were rounded (a 0.3 bias moves
    by ~1e-3 in bf16, enough to change which experts are chosen). Loaded or
    trained values must land in a float32 buffer, as transformers keeps
    ``e_score_correction_bias`` in float32 in bf16 checkpoints.
    """
    import torch

    for module in chunk.modules():
        bias = getattr(module, "expert_bias", None)
        if isinstance(bias, torch.Tensor) and bias.dtype != torch.float32:
            module.expert_bias = bias.float()


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


def expert_parameters(chunk: "torch.nn.Module") -> list:
    """The routed experts' parameters of every megatron MoE layer in ``chunk``."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return [p for m in chunk.modules() if isinstance(m, MoELayer) for p in m.experts.parameters()]


def reduce_experts_over_expert_data_parallel(chunks: list) -> None:
    """Mark every routed-expert parameter for DDP's expert buffers (``allreduce=False``).

    megatron marks expert weights ``allreduce=False`` only when expert
    parallelism is on (EP > 1); with EP = 1 they land in the dense buffers and
    are reduced over the data-parallel group. That is wrong whenever experts
    are sharded over fewer ranks than attention (TP=2, ETP=1, EP=1: both TP
    ranks hold the whole expert but each routes only its slice of the
    sequence): the other TP rank's tokens never reach the gradient (measured:
    0.6-0.8x the single-process gradient, silently). DDP's expert buffers are
    reduced over the expert-data-parallel group, which holds exactly the
    ranks sharing an expert shard, and scaled by megatron for that group; when
    the two groups coincide nothing changes.
    """
    for chunk in chunks:
        for param in expert_parameters(chunk):
            param.allreduce = False


def _megatron_ddp(chunks: list, config: Any, context: "BuildContext") -> list:
    from megatron.core.distributed import DistributedDataParallel

    ddp_config = _ddp_config(context)
    reduce_experts_over_expert_data_parallel(chunks)
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
    own unit breaks weight sharing. Routed experts are units of their own,
    sharded over the expert-data-parallel group (:func:`_fsdp2_experts`),
    before their layer, which then leaves them out.
    """
    import torch
    from megatron.core import parallel_state
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if context.options.broadcast_params:
        raise PipelineError("broadcast_params is for ddp; FSDP2 shards come from one initialisation already")
    mesh = DeviceMesh.from_group(parallel_state.get_data_parallel_group(), device_type=context.device)
    policy = None
    if wants_half(config) and context.options.mixed_precision != "none":
        half = torch.bfloat16 if getattr(config, "bf16", False) else torch.float16
        policy = MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32)
    extra = {"mp_policy": policy} if policy else {}
    saved = {name: dict(param.__dict__) for name, param in chunk.named_parameters()}
    _fsdp2_experts(chunk, context, extra)
    unit_types = context.builder.fsdp_unit_types()
    for module in list(chunk.modules()):
        if isinstance(module, unit_types):
            fully_shard(module, mesh=mesh, **extra)
    fully_shard(chunk, mesh=mesh, **extra)
    _restore_parameter_attributes(chunk, saved)
    return chunk


def _restore_parameter_attributes(chunk: "torch.nn.Module", saved: dict[str, dict]) -> None:
    """Put megatron's attributes back on the DTensor parameters FSDP2 made.

    ``fully_shard`` replaces every parameter with a new DTensor parameter and
    drops the Python attributes megatron hangs on them (``sequence_parallel``,
    ``tensor_model_parallel``, ``partition_dim``, ``allreduce`` ...); code that
    reads them would then skip, silently, the tensor-parallel reduction of
    sequence-parallel norm gradients, or gather a shard as if it were whole.
    """
    for name, param in chunk.named_parameters():
        for key, value in saved.get(name, {}).items():
            param.__dict__.setdefault(key, value)


def _fsdp2_experts(chunk: "torch.nn.Module", context: "BuildContext", extra: dict) -> None:
    """``fully_shard`` each MoE layer's routed experts over the expert-data-parallel group.

    Expert parallelism takes its ranks from data parallelism: the ranks that
    hold the same expert shard (and must average its gradient) are megatron's
    expert-data-parallel group, not the data-parallel one (EP=2 on 2 ranks:
    dense layers are replicated twice, each expert once). Tokens reach their
    experts through the dispatcher's all-to-all, whose backward already sums
    the gradient contributions of every expert-parallel peer; so, like
    megatron's DDP (``expert_gradient_scaling_factor``), the expert gradient is
    divided by the *dense* data-parallel size, not by the size of the group it
    is reduced over (FSDP2's default). With tensor parallelism and ETP < TP
    the expert-data-parallel group also holds tensor-parallel peers, whose
    contributions (their slices of the sequence) are summed the same way.
    """
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    layers = [m for m in chunk.modules() if isinstance(m, MoELayer)]
    if not layers:
        return
    group = parallel_state.get_expert_data_parallel_group()
    mesh = DeviceMesh.from_group(group, device_type=context.device)
    divide = parallel_state.get_data_parallel_world_size()
    for layer in layers:
        experts = fully_shard(layer.experts, mesh=mesh, **extra)
        experts.set_gradient_divide_factor(float(divide))
        if group.size() > 1 and divide != group.size():
            # A factor other than the group's size is a PREMUL_SUM, which gloo lacks; sum, then divide.
            # Not on one rank: torch 2.13 then divides twice (its one-rank copy and its post-divide).
            experts.set_force_sum_reduction_for_comms(True)


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
