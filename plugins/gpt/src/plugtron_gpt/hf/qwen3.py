"""``Qwen3ForCausalLM``: Llama's table and config, no biases, per-head q/k RMSNorm."""

from __future__ import annotations

from typing import Any

from plugtron.conversion import INT, ConfigReader, ConfigSchema

from .adapter import GPTAdapter
from .architecture import Fields
from .llama import LLAMA, head_dim_of, read_decoder, reject_sliding_window, write_decoder
from .qwen2 import QWEN_DEFAULTS, derive_qwen


def _read(k: ConfigReader) -> Fields:
    if k.get("attention_bias"):
        raise k.fail("attention_bias", "Qwen3 puts it on o_proj without MLP biases, which megatron cannot express")
    reject_sliding_window(k, k.get("num_hidden_layers"), typed_layers_only=True)
    return read_decoder(k, add_bias_linear=False, add_qkv_bias=False, qk_layernorm=True)


def _write(f: Fields) -> dict[str, Any]:
    from .rope import need_value

    need_value(f, "add_bias_linear", (False,), QWEN3.name, True)
    need_value(f, "add_qkv_bias", (False,), QWEN3.name, False)
    return {**write_decoder(f, QWEN3.name, qk_layernorm=True), "use_sliding_window": False, "sliding_window": None,
            "head_dim": head_dim_of(f), "attention_bias": False}


QWEN3 = LLAMA.derive(
    name="Qwen3ForCausalLM", model_type="qwen3", config_class="Qwen3Config", read=_read, write=_write,
    schema=ConfigSchema(defaults={**QWEN_DEFAULTS, "head_dim": 128, "attention_bias": False},
                        types={"head_dim": INT}, derive=derive_qwen))

ADAPTER = GPTAdapter(QWEN3)
