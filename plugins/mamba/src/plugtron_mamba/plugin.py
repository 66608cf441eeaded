"""Registration of the Mamba family and its layer specs (no torch import here).

``auto`` picks the available spec with the highest priority: megatron's own
``mamba_ssm`` stack where its GPU kernels and CUDA are present, the
pure-PyTorch ``torch`` spec everywhere else.

The HF converters (``Mamba2ForCausalLM``, ``NemotronHForCausalLM``) are named by
import path; their module loads only when the HF bridge converts one of them.
"""

from __future__ import annotations

from plugtron import ConverterInfo, FamilyInfo, LayerSpecInfo, hookimpl

_SPECS = "plugtron_mamba.specs"
_HF_ADAPTERS = "plugtron_mamba.hf.adapters"


@hookimpl
def plugtron_register_families() -> list[FamilyInfo]:
    return [
        FamilyInfo(
            name="mamba",
            config_class="plugtron_mamba.config:MambaModelConfig",
            builder_class="plugtron_mamba.builder:MambaModelBuilder",
            description="Mamba-2 and hybrid Mamba/attention/MLP models (megatron MambaModel parameter layout)",
        )
    ]


@hookimpl
def plugtron_register_layer_specs() -> list[LayerSpecInfo]:
    return [
        LayerSpecInfo(
            family="mamba",
            name="mamba_ssm",
            factory=f"{_SPECS}:mamba_ssm_spec",
            check=f"{_SPECS}:mamba_ssm_available",
            priority=300,
            description="megatron's MambaStack with mamba_ssm/causal_conv1d kernels and transformer-engine (GPU)",
            cpu_capable=False,
        ),
        LayerSpecInfo(
            family="mamba",
            name="torch",
            factory=f"{_SPECS}:torch_spec",
            check=f"{_SPECS}:torch_available",
            priority=200,
            description="pure-PyTorch Mamba-2 mixer with megatron-core attention/MLP modules (CPU and GPU)",
            cpu_capable=True,
        ),
    ]


@hookimpl
def plugtron_register_converters() -> list[ConverterInfo]:
    return [
        ConverterInfo(
            source_format="hf",
            architecture="Mamba2ForCausalLM",
            family="mamba",
            adapter=f"{_HF_ADAPTERS}:MAMBA2",
            description="Mamba-2 (transformers Mamba2ForCausalLM)",
        ),
        ConverterInfo(
            source_format="hf",
            architecture="NemotronHForCausalLM",
            family="mamba",
            adapter=f"{_HF_ADAPTERS}:NEMOTRON_H",
            description="Nemotron-H hybrid Mamba-2 / attention / relu2-MLP (no MoE, no MTP)",
        ),
    ]
