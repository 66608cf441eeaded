"""``GraniteForCausalLM`` (IBM Granite 3.x dense): Llama with four multipliers.

What transformers' Granite does beyond Llama, and the megatron field for each:

* ``embedding_multiplier``: the token embeddings times it -> ``embedding_multiplier``;
* ``residual_multiplier``: ``h = residual + branch * m`` after attention and after the MLP
  -> ``residual_multiplier``;
* ``attention_multiplier``: the attention score scale *itself* (it replaces
  ``1 / sqrt(head_dim)``) -> megatron's ``softmax_scale``, always written out;
* ``logits_scaling``: logits *divided* by it -> ``logits_divisor``.

A multiplier of exactly 1 is read as "off" (``None``), so a Granite with neutral values
and a Llama describe the same megatron model. Tensors are Llama's.
"""

from __future__ import annotations

import math
from typing import Any

from plugtron.conversion import ConfigReader, ConfigSchema

from .adapter import GPTAdapter
from .architecture import Fields
from .llama import DEFAULTS, LLAMA, head_dim_of

#: Granite config key -> megatron field (``attention_multiplier`` is handled apart: never neutral).
MULTIPLIERS = {"embedding_multiplier": "embedding_multiplier", "residual_multiplier": "residual_multiplier",
               "logits_scaling": "logits_divisor"}


def _number(k: ConfigReader, key: str) -> float:
    value = k.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise k.fail(key, f"must be a finite number, not {value!r:.80}")
    return float(value)


def _derive(values: dict[str, Any]) -> None:
    """GraniteConfig fills ``num_key_value_heads`` from the heads (``head_dim`` is no field of it)."""
    if values["num_key_value_heads"] is None:
        values["num_key_value_heads"] = values["num_attention_heads"]


def _read(k: ConfigReader) -> Fields:
    fields = LLAMA.read(k)
    for key, field in MULTIPLIERS.items():
        value = _number(k, key)
        fields[field] = None if value == 1.0 else value
    if fields["logits_divisor"] is not None and fields["logits_divisor"] <= 0:
        raise k.fail("logits_scaling", f"is {fields['logits_divisor']}; megatron's logits_divisor must be positive")
    fields["softmax_scale"] = _number(k, "attention_multiplier")
    return fields


def _write(f: Fields) -> dict[str, Any]:
    out = LLAMA.write(f)
    if out["head_dim"] == f["hidden_size"] // f["num_attention_heads"]:
        del out["head_dim"]  # no GraniteConfig field; its attention reads it only when present
    for key, field in MULTIPLIERS.items():
        value = f.get(field)
        out[key] = 1.0 if value is None else float(value)
    scale = f.get("softmax_scale")
    out["attention_multiplier"] = head_dim_of(f) ** -0.5 if scale is None else float(scale)
    return out


GRANITE = LLAMA.derive(
    name="GraniteForCausalLM", model_type="granite", config_class="GraniteConfig", read=_read, write=_write,
    schema=ConfigSchema(
        defaults={**DEFAULTS, "vocab_size": 32000, "intermediate_size": 11008, "num_key_value_heads": None,
                  "max_position_embeddings": 2048, "attention_bias": False, "mlp_bias": False,
                  "embedding_multiplier": 1.0, "logits_scaling": 1.0, "residual_multiplier": 1.0,
                  "attention_multiplier": 1.0},
        derive=_derive),
    expresses=frozenset({"embedding_multiplier", "residual_multiplier", "logits_divisor", "softmax_scale"}))

ADAPTER = GPTAdapter(GRANITE)
