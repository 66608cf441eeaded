"""``Qwen2ForCausalLM``: Llama's table and config with q/k/v biases only (Qwen2, Qwen2.5).

Sliding windows follow transformers' Qwen2: ``sliding_window`` counts only
with ``use_sliding_window``, and applies to the layers ``layer_types`` calls
``sliding_attention`` (derived, when absent, as every layer from
``max_window_layers`` on). That is megatron's ``window_size`` plus a
per-layer ``window_attn_skip_freq``.
"""

from __future__ import annotations

from typing import Any

from plugtron.conversion import ConfigReader, ConfigSchema

from .adapter import GPTAdapter
from .architecture import Fields
from .llama import (DEFAULTS, FULL, LLAMA, SLIDING, WINDOW, head_dim_of, layer_types_of, read_decoder, window_fields,
                    windowed_layers, write_decoder)
from .rope import need_value

QWEN_DEFAULTS = {**DEFAULTS, "vocab_size": 151936, "intermediate_size": 22016, "num_key_value_heads": 32,
                 "max_position_embeddings": 32768, "use_sliding_window": False, "sliding_window": 4096,
                 "max_window_layers": 28, "layer_types": None}


def derive_qwen(values: dict[str, Any]) -> None:
    """The window applies only with ``use_sliding_window``, and then from layer ``max_window_layers`` on."""
    if not values["use_sliding_window"]:
        values["sliding_window"] = None
    if values["num_key_value_heads"] is None:
        values["num_key_value_heads"] = values["num_attention_heads"]
    if values["layer_types"] is None:
        window, first = values["sliding_window"], values["max_window_layers"]
        values["layer_types"] = ["sliding_attention" if window is not None and i >= first else "full_attention"
                                 for i in range(values["num_hidden_layers"])]


def read_qwen_window(k: ConfigReader) -> Fields:
    """Window fields of a Qwen2/Qwen3 config (``use_sliding_window`` and ``max_window_layers`` act through
    the derived ``sliding_window`` and ``layer_types``)."""
    k.mark("use_sliding_window", "max_window_layers")
    types = layer_types_of(k, k.get("num_hidden_layers"))
    window = k.get("sliding_window")
    if window is None and SLIDING in types:
        raise k.fail("layer_types", "types layers sliding_attention but the window is off (use_sliding_window false or "
                                    "sliding_window null); transformers cannot build that mask")
    return window_fields(k, window, [t == SLIDING for t in types])


def qwen_window_to_hf(f: Fields, arch: str) -> dict[str, Any]:
    """``use_sliding_window`` / ``sliding_window`` / ``layer_types`` (and ``max_window_layers`` when the
    windowed layers are a suffix, as transformers derives them) for megatron's window fields."""
    window, windowed = windowed_layers(f, arch)
    out: dict[str, Any] = {"use_sliding_window": window is not None, "sliding_window": window,
                           "layer_types": [SLIDING if w else FULL for w in windowed]}
    if window is not None and windowed == sorted(windowed):
        out["max_window_layers"] = windowed.index(True)
    return out


def _read(k: ConfigReader) -> Fields:
    return {**read_decoder(k, add_bias_linear=False, add_qkv_bias=True, qk_layernorm=False), **read_qwen_window(k)}


def _write(f: Fields) -> dict[str, Any]:
    need_value(f, "add_bias_linear", (False,), QWEN2.name, True)
    need_value(f, "add_qkv_bias", (True,), QWEN2.name, False)
    out = {**write_decoder(f, QWEN2.name, qk_layernorm=False), **qwen_window_to_hf(f, QWEN2.name)}
    if head_dim_of(f) != f["hidden_size"] // f["num_attention_heads"]:
        out["head_dim"] = head_dim_of(f)
    return out


QWEN2 = LLAMA.derive(
    name="Qwen2ForCausalLM", model_type="qwen2", config_class="Qwen2Config", read=_read, write=_write,
    expresses=WINDOW,
    schema=ConfigSchema(defaults=QWEN_DEFAULTS, derive=derive_qwen,
                        # Qwen2.5 (and DeepSeek-R1-Distill-Qwen) configs: multimodal 3-D rotary positions, off.
                        harmless_at={"use_mrope": False}))

ADAPTER = GPTAdapter(QWEN2)
