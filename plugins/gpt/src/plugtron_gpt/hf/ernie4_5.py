"""``Ernie4_5ForCausalLM`` (ERNIE 4.5 dense): Llama's table and config, ``use_bias``, interleaved RoPE.

transformers' ERNIE 4.5 rotates adjacent channel pairs: its ``rotate_half``
maps ``(x0, x1, x2, x3 ...)`` to ``(-x1, x0, -x3, x2 ...)`` and
``apply_rotary_pos_emb`` repeats each frequency twice in a row
(``repeat_interleave(2)``), so channels ``2i`` and ``2i + 1`` turn together by
frequency ``i``. That is megatron's ``rotary_interleaved`` (RoFormer style)
with the same inverse frequencies over the whole head; q/k weights need no
permutation. ERNIE computes RoPE in float32 whatever the model dtype, megatron
in the activation dtype: identical in float32, rounding differences in bf16.
``use_bias`` puts biases on q/k/v, o_proj and the MLP alike (megatron's
``add_bias_linear``).
"""

from __future__ import annotations

from typing import Any

from plugtron.conversion import ConfigReader, ConfigSchema

from .adapter import GPTAdapter
from .architecture import Fields
from .llama import DEFAULTS, LLAMA, head_dim_of, read_decoder, single_bias_switch, write_decoder
from .rope import need_value

DEFAULT_THETA = 500000.0  # Ernie4_5Config.default_theta


def _derive(values: dict[str, Any]) -> None:
    if values["num_key_value_heads"] is None:
        values["num_key_value_heads"] = values["num_attention_heads"]
    if values["head_dim"] is None:
        values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]


def _read(k: ConfigReader) -> Fields:
    bias = k.get("use_bias")  # declared bool | None; None builds no biases
    if bias not in (True, False, None) or isinstance(bias, int) and not isinstance(bias, bool):
        raise k.fail("use_bias", f"must be true, false or null, not {bias!r:.80}")
    bias = bool(bias)
    fields = read_decoder(k, add_bias_linear=bias, add_qkv_bias=bias, qk_layernorm=False,
                          rope_theta_default=DEFAULT_THETA)
    if fields["position_embedding_type"] != "rope":
        raise k.fail("rope_parameters.rope_type", "YaRN is refused with ERNIE's interleaved rotary (megatron's YaRN "
                                                  "does not interleave)")
    return {**fields, "rotary_interleaved": True}


def _write(f: Fields) -> dict[str, Any]:
    arch = ERNIE4_5.name
    need_value(f, "rotary_interleaved", (True,), arch, False)
    bias = single_bias_switch(f, arch)
    return {**write_decoder(f, arch, qk_layernorm=False), "head_dim": head_dim_of(f), "use_bias": bias}


ERNIE4_5 = LLAMA.derive(
    name="Ernie4_5ForCausalLM", model_type="ernie4_5", config_class="Ernie4_5Config", read=_read, write=_write,
    expresses=frozenset({"rotary_interleaved"}),
    schema=ConfigSchema(
        defaults={**DEFAULTS, "vocab_size": 103424, "hidden_size": 1024, "intermediate_size": 3072,
                  "num_hidden_layers": 18, "num_attention_heads": 16, "num_key_value_heads": 2,
                  "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
                  "use_bias": False, "head_dim": 128},
        derive=_derive))

ADAPTER = GPTAdapter(ERNIE4_5)
