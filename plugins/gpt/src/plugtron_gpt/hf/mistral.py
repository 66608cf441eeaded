"""``MistralForCausalLM``: Llama's table and config, no biases, a sliding window that must be off."""

from __future__ import annotations

from typing import Any

from plugtron.conversion import INT, ConfigReader, ConfigSchema

from .adapter import GPTAdapter
from .architecture import Fields
from .llama import DEFAULTS, LLAMA, derive_heads, head_dim_of, read_decoder, reject_sliding_window, write_decoder


def _read(k: ConfigReader) -> Fields:
    reject_sliding_window(k, k.get("num_hidden_layers"))
    return read_decoder(k, add_bias_linear=False, add_qkv_bias=False, qk_layernorm=False)


def _write(f: Fields) -> dict[str, Any]:
    from .rope import need_value

    need_value(f, "add_bias_linear", (False,), MISTRAL.name, True)
    need_value(f, "add_qkv_bias", (False,), MISTRAL.name, False)
    return {**write_decoder(f, MISTRAL.name, qk_layernorm=False), "head_dim": head_dim_of(f), "sliding_window": None}


MISTRAL = LLAMA.derive(
    name="MistralForCausalLM", model_type="mistral", config_class="MistralConfig", read=_read, write=_write,
    schema=ConfigSchema(
        defaults={**DEFAULTS, "vocab_size": 32000, "intermediate_size": 14336, "num_key_value_heads": 8,
                  "max_position_embeddings": 4096 * 32, "head_dim": None, "sliding_window": 4096},
        types={"num_key_value_heads": INT}, derive=derive_heads))

ADAPTER = GPTAdapter(MISTRAL)
