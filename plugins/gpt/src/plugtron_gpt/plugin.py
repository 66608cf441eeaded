"""Registration of the GPT family, its layer specs and its HF architectures (no torch import here)."""

from __future__ import annotations

from plugtron import ConverterInfo, FamilyInfo, LayerSpecInfo, hookimpl

_SPECS = "plugtron_gpt.specs"


@hookimpl
def plugtron_register_families() -> list[FamilyInfo]:
    return [
        FamilyInfo(
            name="gpt",
            config_class="plugtron_gpt.config:GPTModelConfig",
            builder_class="plugtron_gpt.builder:GPTModelBuilder",
            description="decoder-only transformers (Llama, Qwen, Gemma, GLM, Mixtral ...), RoPE variants, MoE, MLA and MTP",
        )
    ]


def _spec(name: str, priority: int, description: str, cpu: bool) -> LayerSpecInfo:
    return LayerSpecInfo(
        family="gpt",
        name=name,
        factory=f"{_SPECS}:{name}_spec",
        check=f"{_SPECS}:{name}_available",
        priority=priority,
        description=description,
        cpu_capable=cpu,
    )


@hookimpl
def plugtron_register_layer_specs() -> list[LayerSpecInfo]:
    return [
        _spec("te", 300, "transformer-engine modules with fused layer norms (GPU)", False),
        _spec("te_full", 280, "transformer-engine op fuser for the whole layer (GPU)", False),
        _spec("torch", 200, "megatron modules with torch scaled_dot_product_attention (CPU and GPU)", True),
        _spec("local", 150, "megatron-core's own modules only (CPU and GPU)", True),
        _spec("modelopt", 50, "NVIDIA ModelOpt quantization-ready spec (GPU)", False),
    ]


@hookimpl
def plugtron_register_converters() -> list[ConverterInfo]:
    """One record per HF architecture module (:mod:`plugtron_gpt.hf.catalogue`); modules load on use."""
    from plugtron_gpt.hf.catalogue import ARCHITECTURES, adapter_path

    return [ConverterInfo(source_format="hf", architecture=arch, family="gpt", adapter=adapter_path(arch),
                          description=description)
            for arch, (_, description) in ARCHITECTURES.items()]
