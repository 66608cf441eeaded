"""``Qwen3ForCausalLM``: Llama's table and config, no biases, per-head q/k RMSNorm, Qwen2's sliding windows."""

from __future__ import annotations

from typing import Any

from plugtron.conversion import INT, ConfigReader, ConfigSchema

from .adapter import GPTAdapter
from .architecture import Fields
from .llama import LLAMA, WINDOW, head_dim_of, read_decoder, write_decoder
from .qwen2 import QWEN_DEFAULTS, derive_qwen, qwen_window_to_hf, read_qwen_window
from .rope import need_value


def _read(k: ConfigReader) -> Fields:
    if k.get("attention_bias"):
        raise k.fail("attention_bias", "Qwen3 puts it on o_proj without MLP biases, which megatron cannot express")
    return {**read_decoder(k, add_bias_linear=False, add_qkv_bias=False, qk_layernorm=True), **read_qwen_window(k)}


def _write(f: Fields) -> dict[str, Any]:
    need_value(f, "add_bias_linear", (False,), QWEN3.name, True)
    need_value(f, "add_qkv_bias", (False,), QWEN3.name, False)
    return {**write_decoder(f, QWEN3.name, qk_layernorm=True), **qwen_window_to_hf(f, QWEN3.name),
            "head_dim": head_dim_of(f), "attention_bias": False}


QWEN3 = LLAMA.derive(
    name="Qwen3ForCausalLM", model_type="qwen3", config_class="Qwen3Config", read=_read, write=_write,
    expresses=WINDOW,
    schema=ConfigSchema(defaults={**QWEN_DEFAULTS, "head_dim": 128, "attention_bias": False},
                        types={"head_dim": INT}, derive=derive_qwen))

ADAPTER = GPTAdapter(QWEN3)
