"""``Qwen2ForCausalLM``: Llama's table and config with q/k/v biases only (Qwen2, Qwen2.5)."""

from __future__ import annotations

from typing import Any

from plugtron.conversion import ConfigReader, ConfigSchema

from .adapter import GPTAdapter
from .architecture import Fields
from .llama import DEFAULTS, LLAMA, head_dim_of, read_decoder, reject_sliding_window, write_decoder

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


def _read(k: ConfigReader) -> Fields:
    reject_sliding_window(k, k.get("num_hidden_layers"), typed_layers_only=True)
    return read_decoder(k, add_bias_linear=False, add_qkv_bias=True, qk_layernorm=False)


def _write(f: Fields) -> dict[str, Any]:
    from .rope import need_value

    need_value(f, "add_bias_linear", (False,), QWEN2.name, True)
    need_value(f, "add_qkv_bias", (True,), QWEN2.name, False)
    out = {**write_decoder(f, QWEN2.name, qk_layernorm=False), "use_sliding_window": False, "sliding_window": None}
    if head_dim_of(f) != f["hidden_size"] // f["num_attention_heads"]:
        out["head_dim"] = head_dim_of(f)
    return out


QWEN2 = LLAMA.derive(
    name="Qwen2ForCausalLM", model_type="qwen2", config_class="Qwen2Config", read=_read, write=_write,
    schema=ConfigSchema(defaults=QWEN_DEFAULTS, derive=derive_qwen,
                        # Qwen2.5 (and DeepSeek-R1-Distill-Qwen) configs: multimodal 3-D rotary positions, off.
                        harmless_at={"use_mrope": False}))

ADAPTER = GPTAdapter(QWEN2)
