"""Registration of the HF bridge: converters and commands. No torch import here.

The built-in adapters are named by import path and loaded only when a
conversion of that architecture runs; the commands import their heavy
modules inside ``run``.
"""

from __future__ import annotations

from typing import Any

from plugtron import ConverterInfo, hookimpl

_ADAPTERS = {
    "LlamaForCausalLM": ("LLAMA", "Llama / Llama-2 / Llama-3 (RoPE incl. llama3 and linear scaling)"),
    "MistralForCausalLM": ("MISTRAL", "Mistral without active sliding-window attention"),
    "Qwen2ForCausalLM": ("QWEN2", "Qwen2 / Qwen2.5 (qkv bias, YaRN)"),
    "Qwen3ForCausalLM": ("QWEN3", "Qwen3 dense (q/k layer norms)"),
    "GPT2LMHeadModel": ("GPT2", "GPT-2 (learned positions, LayerNorm, GeLU-tanh)"),
}


@hookimpl
def plugtron_register_converters() -> list[ConverterInfo]:
    return [
        ConverterInfo(source_format="hf", architecture=arch, family="gpt",
                      adapter=f"plugtron_hf_bridge.adapter:{attr}", description=description)
        for arch, (attr, description) in _ADAPTERS.items()
    ]


@hookimpl
def plugtron_add_commands(commands: Any) -> None:
    from plugtron_hf_bridge import cli

    cli.add_parsers(commands)
