"""``MistralForCausalLM``: Llama's table and config, no biases, a sliding window on every layer.

transformers' Mistral applies ``sliding_window`` (Mistral-7B-v0.1: 4096) to
every layer and ignores ``layer_types`` (it warns and points to Ministral), so
a file whose ``layer_types`` say otherwise is refused rather than read one way
or the other.
"""

from __future__ import annotations

from typing import Any

from plugtron.conversion import INT, ConfigReader, ConfigSchema

from .adapter import GPTAdapter
from .architecture import Fields
from .llama import (DEFAULTS, FULL, LLAMA, SLIDING, WINDOW, derive_heads, head_dim_of, read_decoder, read_uniform_window,
                    uniform_window_to_hf, write_decoder)
from .rope import need_value


def _read(k: ConfigReader) -> Fields:
    layers = k.get("num_hidden_layers")
    window = k.get("sliding_window")
    types = k.raw("layer_types")
    if types is not None and types != [FULL if window is None else SLIDING] * layers:
        raise k.fail("layer_types", f"{types!r:.200} is ignored by transformers' Mistral, which applies sliding_window "
                                    f"{window} to every layer; per-layer attention types are Ministral's")
    return {**read_decoder(k, add_bias_linear=False, add_qkv_bias=False, qk_layernorm=False),
            **read_uniform_window(k, layers)}


def _write(f: Fields) -> dict[str, Any]:
    need_value(f, "add_bias_linear", (False,), MISTRAL.name, True)
    need_value(f, "add_qkv_bias", (False,), MISTRAL.name, False)
    return {**write_decoder(f, MISTRAL.name, qk_layernorm=False), "head_dim": head_dim_of(f),
            "sliding_window": uniform_window_to_hf(f, MISTRAL.name)}


MISTRAL = LLAMA.derive(
    name="MistralForCausalLM", model_type="mistral", config_class="MistralConfig", read=_read, write=_write,
    expresses=WINDOW,
    schema=ConfigSchema(
        defaults={**DEFAULTS, "vocab_size": 32000, "intermediate_size": 14336, "num_key_value_heads": 8,
                  "max_position_embeddings": 4096 * 32, "head_dim": None, "sliding_window": 4096},
        types={"num_key_value_heads": INT}, derive=derive_heads))

ADAPTER = GPTAdapter(MISTRAL)
