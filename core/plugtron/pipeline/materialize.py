"""Turning a meta-device build into real tensors without losing anything.

``Module.to_empty`` replaces *every* tensor, including buffers that were
computed on the CPU at construction (RoPE ``inv_freq``) and the Python
attributes megatron hangs on parameters (``tensor_model_parallel``,
``partition_dim`` ...). Both are saved before and restored after; parameters
are then initialised the way an eager build initialises them. A buffer that
was itself created on the meta device has no value to restore: that is an
error naming it, unless the module can recompute it (``reset_buffers()``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from plugtron.errors import PipelineError

if TYPE_CHECKING:
    import torch

    from plugtron.builder import ModelBuilder


def _set_buffer(root: "torch.nn.Module", name: str, value: "torch.Tensor") -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    owner._buffers[leaf] = value


def materialize(chunk: "torch.nn.Module", device: str, builder: "ModelBuilder", load_weights: Any = None) -> None:
    """Allocate real storage for ``chunk``; fill it with ``load_weights(chunk)`` or a fresh init."""
    import torch

    real_buffers = {n: b for n, b in chunk.named_buffers() if not b.is_meta}
    meta_buffers = [n for n, b in chunk.named_buffers() if b.is_meta]
    param_attrs = {n: dict(p.__dict__) for n, p in chunk.named_parameters()}
    chunk.to_empty(device=device)
    for name, value in real_buffers.items():
        _set_buffer(chunk, name, value.to(device))
    for name, param in chunk.named_parameters():
        for key, value in param_attrs.get(name, {}).items():
            param.__dict__.setdefault(key, value)
    with torch.no_grad():
        if load_weights is not None:
            from plugtron.runtime.prefault import populate

            populate(chunk.parameters())  # every byte is about to be written: one call, not a fault per page
            load_weights(chunk)
        else:
            builder.initialize_parameters(chunk)
        _recompute_meta_buffers(chunk, meta_buffers)


def _recompute_meta_buffers(chunk: "torch.nn.Module", names: list[str]) -> None:
    missing = []
    for name in names:
        owner_name = name.rpartition(".")[0]
        owner = chunk.get_submodule(owner_name) if owner_name else chunk
        reset = getattr(owner, "reset_buffers", None)
        if callable(reset):
            reset()
        else:
            missing.append(name)
    if missing:
        raise PipelineError(
            "these buffers were created on the meta device and have no real value after materialisation: "
            + ", ".join(missing)
            + " (create them with an explicit CPU device, or give their module a reset_buffers() method)"
        )


_OUTPUT_PROJECTIONS = ("linear_proj.weight", "linear_fc2.weight", "out_proj.weight")


def megatron_default_init(module: "torch.nn.Module", config: Any) -> None:
    """Initialise parameters as megatron-core's eager construction does.

    Norm weights 1 (0 with zero-centred gamma), biases 0, the projections that
    write into the residual stream with ``output_layer_init_method``, embeddings
    with ``embedding_init_method``, every other weight with ``init_method``.
    Tensor-parallel shards draw from megatron's model-parallel RNG state, so
    ranks differ as they do in an eager build.
    """
    from megatron.core import tensor_parallel

    zero_gamma = bool(getattr(config, "layernorm_zero_centered_gamma", False))
    for mod_name, mod in module.named_modules():
        is_norm = "norm" in type(mod).__name__.lower()
        for p_name, param in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if p_name.endswith("bias"):
                param.zero_()
            elif (is_norm and param.dim() == 1) or "layer_norm_weight" in p_name:  # not TE's LN+linear weight
                param.fill_(0.0 if zero_gamma else 1.0)
            else:
                init = _init_for(full, config)
                if getattr(param, "tensor_model_parallel", False):
                    with tensor_parallel.get_cuda_rng_tracker().fork():
                        init(param)
                else:
                    init(param)


def _init_for(name: str, config: Any) -> Any:
    if name.endswith(_OUTPUT_PROJECTIONS):
        return config.output_layer_init_method
    if "embedding" in name:
        return getattr(config, "embedding_init_method", None) or config.init_method
    return config.init_method
