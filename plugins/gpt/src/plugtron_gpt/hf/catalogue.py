"""The Hugging Face architectures the GPT family converts: one module each, listed here once.

``plugin.py`` registers a converter record per entry without importing the
modules (plugin discovery stays cheap); the functions below are the same
translation keyed by architecture name, for tests, benchmarks and scripts.
"""

from __future__ import annotations

import importlib
from typing import Any

from plugtron.conversion import UnsupportedConfigError

#: architecture -> (module under ``plugtron_gpt.hf``, one-line description for ``plugtron plugins``)
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "Llama / Llama-2 / Llama-3 (RoPE incl. llama3 and linear scaling)"),
    "MistralForCausalLM": ("mistral", "Mistral (v0.1 sliding window included)"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2 / Qwen2.5 (qkv bias, YaRN, sliding window)"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3 dense (q/k layer norms)"),
    "GPT2LMHeadModel": ("gpt2", "GPT-2 (learned positions, LayerNorm, GeLU-tanh)"),
    "GemmaForCausalLM": ("gemma", "Gemma (scaled embeddings, (1 + w) RMSNorm, GeGLU)"),
    "Gemma2ForCausalLM": ("gemma2", "Gemma 2 (sandwich norms, soft-capping, alternating sliding window)"),
    "Gemma3ForCausalLM": ("gemma3", "Gemma 3 text (q/k norms, local and global RoPE bases)"),
    "Phi3ForCausalLM": ("phi3", "Phi-3 / Phi-4 (fused qkv and gate_up)"),
    "Olmo2ForCausalLM": ("olmo2", "OLMo 2 (post-norms, full-width q/k norms)"),
    "GraniteForCausalLM": ("granite", "Granite (embedding, residual, attention and logit multipliers)"),
    "SmolLM3ForCausalLM": ("smollm3", "SmolLM3 (layers without RoPE)"),
    "StableLmForCausalLM": ("stablelm", "StableLM (partial rotary, LayerNorm with bias)"),
    "Starcoder2ForCausalLM": ("starcoder2", "StarCoder2 (biases, LayerNorm, GeLU MLP, sliding window)"),
    "GlmForCausalLM": ("glm", "GLM-4 (interleaved partial rotary, fused gate_up)"),
    "Glm4ForCausalLM": ("glm4", "GLM-4-0414 (GLM with post-norms)"),
    "NemotronForCausalLM": ("nemotron", "Nemotron (squared ReLU, LayerNorm1p, partial rotary)"),
    "Ernie4_5ForCausalLM": ("ernie4_5", "ERNIE 4.5 dense (interleaved rotary)"),
    "Qwen3MoeForCausalLM": ("qwen3_moe", "Qwen3-MoE (routed experts, per-expert streaming at any EP)"),
    "MixtralForCausalLM": ("mixtral", "Mixtral (routed experts)"),
    "OlmoeForCausalLM": ("olmoe", "OLMoE (routed experts, full-width q/k norms)"),
    "Qwen2MoeForCausalLM": ("qwen2_moe", "Qwen2-MoE / Qwen1.5-MoE (routed and gated shared experts)"),
    "GptOssForCausalLM": ("gpt_oss", "gpt-oss (read fully; refused: attention sinks, fused interleaved experts)"),
    "DeepseekV3ForCausalLM": ("deepseek_v3", "DeepSeek-V3 / Kimi-K2 / Moonlight (MLA, sigmoid router, expert bias, groups)"),
    "DeepseekV2ForCausalLM": ("deepseek_v2", "DeepSeek-V2 / V2-Lite (MLA, softmax router, shared experts)"),
    "Glm4MoeForCausalLM": ("glm4_moe", "GLM-4.5 / GLM-4.5-Air (partial rotary, qkv bias, DeepSeek-V3 router)"),
}


def adapter_path(architecture: str) -> str:
    return f"plugtron_gpt.hf.{ARCHITECTURES[architecture][0]}:ADAPTER"


def adapter(architecture: str) -> Any:
    """The built-in :class:`~.adapter.GPTAdapter` of ``architecture``."""
    if architecture not in ARCHITECTURES:
        raise UnsupportedConfigError("architectures", f"{architecture!r} is not one of {sorted(ARCHITECTURES)}")
    return importlib.import_module(f"plugtron_gpt.hf.{ARCHITECTURES[architecture][0]}").ADAPTER


def architecture_of(hf_config: dict[str, Any], source: str | None = None) -> str:
    """The built-in architecture ``architectures`` names, else the one of ``model_type``."""
    archs = hf_config.get("architectures") or []
    if archs:
        found = [a for a in archs if a in ARCHITECTURES]
        if len(found) != 1:
            raise UnsupportedConfigError("architectures", f"{archs} must name exactly one of {sorted(ARCHITECTURES)}",
                                         source=source)
        return found[0]
    by_type = {adapter(a).model_type: a for a in ARCHITECTURES}
    if hf_config.get("model_type") not in by_type:
        raise UnsupportedConfigError("model_type", f"{hf_config.get('model_type')!r} is not one of {sorted(by_type)}",
                                     source=source)
    return by_type[hf_config["model_type"]]


def to_megatron_fields(hf_config: dict[str, Any], architecture: str | None = None, *,
                       source: str | None = None) -> dict[str, Any]:
    """megatron config fields for ``hf_config`` (architecture from the file unless given)."""
    return adapter(architecture or architecture_of(hf_config, source)).to_fields(hf_config, source=source)


def from_megatron_fields(fields: dict[str, Any], architecture: str,
                         passthrough: dict[str, Any] | None = None) -> dict[str, Any]:
    """An HF config dict for megatron ``fields`` (imports transformers for the config class)."""
    return adapter(architecture).fields_to_hf(fields, passthrough)


def mapping_for(architecture: str, fields: dict[str, Any], te_fused_norms: bool = False,
                padded_vocab_size: int | None = None) -> list[Any]:
    """The tensor table of ``architecture`` expanded for megatron ``fields``."""
    return adapter(architecture).mappings(fields, te_fused_norms=te_fused_norms, padded_vocab_size=padded_vocab_size)
