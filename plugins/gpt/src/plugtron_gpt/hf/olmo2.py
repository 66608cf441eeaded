"""``Olmo2ForCausalLM`` (OLMo 2): norms on the sublayer outputs only, and full-width q/k norms.

An OLMo 2 layer computes ``h = h + post_attention_layernorm(attn(h))`` then
``h = h + post_feedforward_layernorm(mlp(h))``: no pre-norms at all (megatron's
``norm_placement='post'``; HF's ``post_attention_layernorm`` here is a post-norm, unlike
Llama's). In attention, ``q_norm`` is one RMSNorm over the whole q projection
(``num_heads * head_dim`` channels) and ``k_norm`` one over the whole k projection, both
before RoPE: ``qk_layernorm`` with ``qk_norm_scope='full'`` (megatron's own q/k norms are
per head). ``attention_bias`` would bias q/k/v and ``o_proj`` but not the MLP, which
megatron's ``add_bias_linear`` cannot express, so it is refused.
"""

from __future__ import annotations

from typing import Any

from plugtron.conversion import ConfigReader, ConfigSchema, direct, layer

from .adapter import GPTAdapter
from .architecture import Fields
from .glm4 import POST_ATTN_NORM, POST_MLP_NORM
from .llama import LLAMA, head_dim_of, read_decoder, write_decoder
from .rope import need_value

_LAYER = "decoder.layers.{i}."

TABLE = (LLAMA.table
         .without(_LAYER + "{in_w}", _LAYER + "{mlp_w}")
         .replace(_LAYER + "self_attention.q_layernorm.weight",
                  lambda r: direct("model.layers.{i}.self_attn.q_norm.weight", r.megatron, ("Q",), r.when))
         .replace(_LAYER + "self_attention.k_layernorm.weight",
                  lambda r: direct("model.layers.{i}.self_attn.k_norm.weight", r.megatron, ("KV",), r.when))
         + layer("model.layers.{i}.", [
             direct("post_attention_layernorm.weight", POST_ATTN_NORM, ("H",)),
             direct("post_feedforward_layernorm.weight", POST_MLP_NORM, ("H",)),
         ]))


def _derive(values: dict[str, Any]) -> None:
    """Olmo2Config fills ``num_key_value_heads`` from the heads (``head_dim`` is no field of it)."""
    if values["num_key_value_heads"] is None:
        values["num_key_value_heads"] = values["num_attention_heads"]


def _read(k: ConfigReader) -> Fields:
    if k.get("attention_bias"):
        raise k.fail("attention_bias", "OLMo 2 biases q/k/v and o_proj but not the MLP, which megatron cannot express")
    fields = read_decoder(k, add_bias_linear=False, add_qkv_bias=False, qk_layernorm=True)
    return {**fields, "qk_norm_scope": "full", "norm_placement": "post"}


def _write(f: Fields) -> dict[str, Any]:
    arch = OLMO2.name
    need_value(f, "add_bias_linear", (False,), arch, True)
    need_value(f, "add_qkv_bias", (False,), arch, False)
    need_value(f, "qk_norm_scope", ("full",), arch, "head")
    need_value(f, "norm_placement", ("post",), arch, "pre")
    out = {**write_decoder(f, arch, qk_layernorm=True), "attention_bias": False}
    if head_dim_of(f) != f["hidden_size"] // f["num_attention_heads"]:
        out["head_dim"] = head_dim_of(f)  # not an Olmo2Config field, but its attention reads it when present
    return out


OLMO2 = LLAMA.derive(
    name="Olmo2ForCausalLM", model_type="olmo2", config_class="Olmo2Config", table=TABLE, read=_read, write=_write,
    schema=ConfigSchema(
        defaults={"vocab_size": 50304, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu",
                  "max_position_embeddings": 2048, "tie_word_embeddings": False, "attention_bias": False,
                  "rms_norm_eps": 1e-5},
        derive=_derive),
    expresses=frozenset({"norm_placement", "qk_norm_scope"}))

ADAPTER = GPTAdapter(OLMO2)
