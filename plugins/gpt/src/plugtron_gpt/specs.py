"""GPT layer specs and their availability checks.

Checks look for modules with ``importlib.util.find_spec`` (no import) and ask
torch about CUDA, so ``auto`` really picks what works here (tests replace
only ``plugtron.availability.module_present`` and ``cuda_present`` to see
the choice on a GPU machine). The MTP block
copies the chosen layer spec and takes its norms and linears from the same
backend (see :mod:`plugtron_gpt.mtp`).
"""

from __future__ import annotations

from typing import Any

from plugtron import Availability
from plugtron.availability import gpu_modules


def te_available() -> Availability:
    return gpu_modules(("transformer_engine", "transformer-engine[pytorch]"))


def te_full_available() -> Availability:
    return te_available()


def modelopt_available() -> Availability:
    return gpu_modules(("modelopt", "nvidia-modelopt"))


def torch_available() -> Availability:
    return Availability.yes("pure PyTorch, runs on CPU and GPU")


def local_available() -> Availability:
    return Availability.yes("megatron-core modules only, runs on CPU and GPU")


def local_spec(config: Any) -> Any:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm, normalization=config.normalization)


def torch_spec(config: Any) -> Any:
    from plugtron_gpt.attention import SDPACoreAttention

    spec = local_spec(config)
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec


def te_spec(config: Any) -> Any:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)


def te_full_spec(config: Any) -> Any:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm, use_te_op_fuser=True)


def modelopt_spec(config: Any) -> Any:
    from megatron.core.post_training.modelopt.gpt.model_specs import get_gpt_modelopt_spec

    return get_gpt_modelopt_spec(config=config.transformer, remap_te_layernorm=True)


def uses_transformer_engine(spec_name: str) -> bool:
    return spec_name in {"te", "te_full"}
