"""The Mamba family's layer specs and their availability checks.

A spec factory returns the *stack* spec (the decoder of the whole model), as
megatron's ``MambaModel`` takes it:

* ``torch``: :class:`~plugtron_mamba.stack.HybridStack` with megatron's
  ``MambaLayer`` around the pure-PyTorch :class:`TorchMambaMixer`, and megatron
  ``TransformerLayer`` objects built from megatron-core's own modules for the
  attention and MLP layers, and megatron's ``MoELayer`` (SequentialMLP experts,
  shared expert, allgather/alltoall dispatchers) for the ``E`` layers behind a
  separate pre-MLP norm, as in megatron's own Mamba spec. The first projection
  of every Mamba, attention and MLP layer carries its input norm (:class:`~plugtron_mamba.layers.ColumnParallelLinearWithLN`), so
  parameter names are those of megatron's TE-based Mamba spec. CPU and GPU.
* ``mamba_ssm``: megatron's own ``mamba_stack_spec`` (``MambaStack``,
  ``MambaMixer`` with the mamba_ssm / causal_conv1d kernels, transformer-engine
  layers). GPU only; written against megatron's API and not run on a GPU by
  this project.

Checks use ``importlib.util.find_spec`` and ``torch.cuda.is_available`` only
(tests replace ``plugtron.availability.module_present`` and ``cuda_present`` to see the choice a GPU machine
would make).
"""

from __future__ import annotations

import copy
from typing import Any

from plugtron import Availability
from plugtron.availability import gpu_modules

#: Python modules the ``mamba_ssm`` spec needs, with the pip package that provides each.
GPU_MODULES = {"mamba_ssm": "mamba-ssm", "causal_conv1d": "causal-conv1d", "transformer_engine": "transformer-engine[pytorch]"}


def mamba_ssm_available() -> Availability:
    return gpu_modules(*GPU_MODULES.items())


def torch_available() -> Availability:
    return Availability.yes("pure-PyTorch Mamba-2 mixer and megatron-core modules, runs on CPU and GPU")


#: Initialisation arguments of megatron's mixer, at megatron's defaults. Passed to the mixer
#: explicitly so that the meta-device init (the builder) draws from the same ranges.
MIXER_INIT = {"dt_min": 0.001, "dt_max": 0.1, "dt_init_floor": 1e-4, "A_init_range": (1, 16), "conv_init": None}


def mixer_params(config: Any) -> dict[str, Any]:
    """Constructor arguments of the mixer that megatron does not read from its TransformerConfig."""
    sizes = {"expand": config.mamba_expand, "d_conv": config.mamba_conv_kernel, "chunk_size": config.mamba_chunk_size}
    return {**sizes, **MIXER_INIT}


def torch_spec(config: Any) -> Any:
    """``HybridStack`` over ``MambaLayer(TorchMambaMixer)`` and megatron's local attention/MLP modules."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.tensor_parallel import RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    from plugtron_mamba.layers import ColumnParallelLinearWithLN, TorchFinalNorm
    from plugtron_mamba.stack import hybrid_stack_spec
    from plugtron_mamba.torch_impl import TorchMambaMixer, TorchMambaMixerSubmodules

    mixer = ModuleSpec(
        module=TorchMambaMixer,
        submodules=TorchMambaMixerSubmodules(in_proj=ColumnParallelLinearWithLN, out_proj=RowParallelLinear),
        params=mixer_params(config),
    )
    mamba_layer = ModuleSpec(module=MambaLayer, submodules=MambaLayerSubmodules(mixer=mixer, mamba_bda=get_bias_dropout_add))
    attention = ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinearWithLN, core_attention=DotProductAttention, linear_proj=RowParallelLinear
        ),
    )
    attention_layer = ModuleSpec(
        module=TransformerLayer, submodules=TransformerLayerSubmodules(self_attention=attention, self_attn_bda=get_bias_dropout_add)
    )
    mlp = ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinearWithLN, linear_fc2=RowParallelLinear))
    mlp_layer = ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(mlp=mlp, mlp_bda=get_bias_dropout_add))
    from plugtron_mamba.moe import moe_layer_spec

    moe_layer = moe_layer_spec(config) if "E" in config.layer_pattern() else None
    return hybrid_stack_spec(mamba_layer, attention_layer, mlp_layer, TorchFinalNorm, config.layer_pattern(), moe_layer)


def mamba_ssm_spec(config: Any) -> Any:
    """megatron's ``mamba_stack_spec`` with this config's mixer arguments. Not run on a GPU by this project."""
    from megatron.core.models.mamba.mamba_layer_specs import mamba_stack_spec

    spec = copy.deepcopy(mamba_stack_spec)
    mixer = spec.submodules.mamba_layer.submodules.mixer
    mixer.params = {**(mixer.params or {}), **mixer_params(config)}
    return spec
