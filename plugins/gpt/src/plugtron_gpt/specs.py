"""GPT layer specs and their availability checks.

Checks look for modules with ``importlib.util.find_spec`` (no import) and ask
torch about CUDA, so ``auto`` really picks what works here (tests replace
only ``plugtron.availability.module_present`` and ``cuda_present`` to see
the choice on a GPU machine). The MTP block
copies the chosen layer spec and takes its norms and linears from the same
backend (see :mod:`plugtron_gpt.mtp`).

The ``torch`` spec is always a block spec (its final norm must be
:class:`plugtron.runtime.cpu.TorchNorm` too) of the variant layer that
:mod:`plugtron_gpt.torch_layer` builds: it implements every architecture
variant of :mod:`plugtron_gpt.variant_rules`; every factory refuses the
variants its spec lacks (:mod:`plugtron_gpt.features`).

Mixture-of-Experts and Multi-Latent Attention models get a *block* spec: one
layer spec per global layer (dense or MoE by ``moe_layer_freq``) and the final
norm; the builder keeps the layers of each pipeline stage
(:func:`stage_block_spec`). What the CPU-capable specs build for them:

* ``torch``: megatron's MoELayer (router, alltoall/allgather dispatcher,
  SequentialMLP experts, shared experts) and MLASelfAttention with the SDPA
  core attention and **replicated** q/kv down projections (megatron's own
  replicated ``Linear``, as transformer-engine's spec has them: the stock
  local spec's column-parallel ones give wrong gradients at TP > 1); norms
  are :class:`plugtron.runtime.cpu.TorchNorm`, which allow the sequence
  parallelism MoE and MLA need at TP > 1.
* ``local``: megatron's own local spec (its torch norm, TP = 1 only for MoE
  and MLA); for MLA the core attention is SDPA and the down projections are
  replicated, since megatron's DotProductAttention cannot take MLA's head
  sizes.
* ``te``: megatron's transformer-engine decoder layer specs (TEGroupedMLP
  with ``moe_grouped_gemm``, TELinear down projections for MLA). Written
  against megatron-core 0.16.1's API; not run by this project (no GPU here).
"""

from __future__ import annotations

from typing import Any

from plugtron import Availability
from plugtron.availability import gpu_modules
from plugtron_gpt.features import require


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


def _moe_or_mla(config: Any) -> bool:
    return bool(config.num_moe_experts) or bool(config.multi_latent_attention)


def local_spec(config: Any) -> Any:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    require(config, "local")
    if _moe_or_mla(config):
        return _block_spec(config, "local")
    return get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm, normalization=config.normalization)


def torch_spec(config: Any) -> Any:
    """Always a block spec: the final norm must be :class:`~plugtron.runtime.cpu.TorchNorm` too."""
    require(config, "torch")
    return _block_spec(config, "torch")


def te_spec(config: Any) -> Any:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    require(config, "te")
    if _moe_or_mla(config):
        return _block_spec(config, "te")
    return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)


def te_full_spec(config: Any) -> Any:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    require(config, "te_full")
    if _moe_or_mla(config):
        from plugtron.errors import LayerSpecError

        raise LayerSpecError("layer spec 'te_full' (transformer-engine's op fuser) supports neither MoE nor MLA in megatron-core 0.16; use 'te'")
    return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm, use_te_op_fuser=True)


# -- MoE and MLA ------------------------------------------------------------------------
def moe_layer_pattern(num_layers: int, num_moe_experts: int | None, moe_layer_freq: int | list[int]) -> list[int]:
    """1 for a MoE layer, 0 for a dense one, per global layer: megatron's reading of ``moe_layer_freq``
    (an int: every n-th layer from layer 0; a list: 1 = MoE). Plain values, so the HF tables use it too."""
    if not num_moe_experts:
        return [0] * num_layers
    if isinstance(moe_layer_freq, int):
        return [1 if i % moe_layer_freq == 0 else 0 for i in range(num_layers)]
    return list(moe_layer_freq)


def _block_spec(config: Any, backend: str) -> Any:
    """Every global layer's spec and the final norm (the builder slices per stage)."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    tc = config.transformer
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_layer_specs

        layers = get_gpt_decoder_layer_specs(tc, use_transformer_engine=True, normalization=config.normalization)
        return TransformerBlockSubmodules(layer_specs=layers, layer_norm=TENorm)
    pattern = moe_layer_pattern(config.num_layers, config.num_moe_experts, config.moe_layer_freq)
    specs = {kind: _cpu_layer_spec(config, backend, moe=bool(kind)) for kind in set(pattern)}
    layers = [specs[kind] for kind in pattern]
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=_norm_class(backend))


def _norm_class(backend: str) -> Any:
    if backend == "torch":
        from plugtron.runtime.cpu import TorchNorm

        return TorchNorm
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    return WrappedTorchNorm


def _cpu_layer_spec(config: Any, backend: str, *, moe: bool) -> Any:
    """One layer on megatron's local modules, with the substitutions the module doc lists."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from plugtron_gpt.attention import SDPACoreAttention

    spec = get_gpt_layer_local_spec(
        num_experts=config.num_moe_experts if moe else None,
        moe_grouped_gemm=False,
        qk_layernorm=config.qk_layernorm,
        multi_latent_attention=bool(config.multi_latent_attention),
        normalization=config.normalization,
    )
    layer = spec.submodules
    attention = layer.self_attention.submodules
    if config.multi_latent_attention:
        linear = replicated_linear()
        attention.linear_q_down_proj = linear
        attention.linear_kv_down_proj = linear
        attention.core_attention = SDPACoreAttention
    if backend == "torch":
        from plugtron_gpt.torch_layer import torch_layer_spec

        return torch_layer_spec(spec, config)
    return spec


def replicated_linear() -> Any:
    """megatron's replicated (not tensor-parallel) ``Linear``, the one MLA accepts for its down projections.

    MLA compares the class against its own imports, so the class must be
    exactly the one ``multi_latent_attention`` imported.
    """
    from megatron.core.transformer import multi_latent_attention

    from plugtron.runtime.cpu import correct_transformer_engine_flags

    correct_transformer_engine_flags()
    linear = getattr(multi_latent_attention, "Linear", None)
    if linear is None:
        from plugtron.errors import LayerSpecError

        raise LayerSpecError("megatron-core's replicated Linear (post_training.modelopt.layers) did not import; MLA needs it for its down projections")
    return linear


def stage_block_spec(spec: Any, config: Any, vp_stage: int | None) -> Any:
    """The layers of this pipeline stage from a block spec of every global layer (other specs unchanged)."""
    from megatron.core.transformer.enums import LayerType
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    if not isinstance(spec, TransformerBlockSubmodules) or len(spec.layer_specs) != config.num_layers:
        return spec
    tc = config.transformer
    layout = tc.pipeline_model_parallel_layout
    if layout is not None:
        ids = layout.get_layer_id_list(layer_type=LayerType.decoder, vp_stage=vp_stage)
        layers = [spec.layer_specs[i] for i in ids]
    else:
        offset = get_transformer_layer_offset(tc, vp_stage=vp_stage)
        layers = spec.layer_specs[offset : offset + get_num_layers_to_build(tc, vp_stage=vp_stage)]
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=spec.layer_norm)


def modelopt_spec(config: Any) -> Any:
    from megatron.core.post_training.modelopt.gpt.model_specs import get_gpt_modelopt_spec

    require(config, "modelopt")
    return get_gpt_modelopt_spec(config=config.transformer, remap_te_layernorm=True)


def uses_transformer_engine(spec_name: str) -> bool:
    return spec_name in {"te", "te_full"}
