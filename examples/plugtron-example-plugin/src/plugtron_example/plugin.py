"""The hook implementations plugtron finds through the ``example`` entry point.

Keep this module cheap to import: it is loaded whenever plugtron starts,
including by ``plugtron plugins``. Classes and factories are therefore named
by import path; torch and megatron are imported only by the modules those
paths point to, and only when a ``toy`` model is actually built.
"""

from __future__ import annotations

from typing import Any

from plugtron import ConverterInfo, FamilyInfo, LayerSpecInfo, hookimpl

#: Attribute set on every model chunk by :func:`plugtron_post_wrap`.
SEEN_ATTRIBUTE = "plugtron_example_seen"


@hookimpl
def plugtron_register_families() -> list[FamilyInfo]:
    return [
        FamilyInfo(
            name="toy",
            config_class="plugtron_example.config:ToyConfig",
            builder_class="plugtron_example.builder:ToyBuilder",
            description="a small GPT-style model from the example plugin",
        )
    ]


@hookimpl
def plugtron_register_layer_specs() -> list[LayerSpecInfo]:
    return [
        LayerSpecInfo(
            family="toy",
            name="local",
            factory="plugtron_example.specs:local_spec",
            check="plugtron_example.specs:local_available",
            priority=100,
            description="megatron-core's local modules (CPU and GPU)",
            cpu_capable=True,
        )
    ]


@hookimpl
def plugtron_register_converters() -> list[ConverterInfo]:
    """An HF architecture for the ``gpt`` family, converted by the same engine as the built-in ones."""
    return [ConverterInfo(source_format="hf", architecture="SeedOssForCausalLM", family="gpt",
                          adapter="plugtron_example.seed_oss:ADAPTER", description="Seed-OSS (Llama with q/k/v biases)")]


@hookimpl
def plugtron_post_wrap(model: list[Any], config: Any, context: Any) -> None:
    """Mark every finished chunk, so tests can see that third-party hooks run."""
    for chunk in model:
        setattr(chunk, SEEN_ATTRIBUTE, True)
    return None
