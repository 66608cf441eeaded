"""``OlmoeForCausalLM`` (OLMoE): a pre-norm Llama-like with full-width q/k norms and routed experts.

Unlike OLMo 2 (post-norms), OLMoE keeps Llama's pre-norms; like OLMo 2 its
``q_norm`` is one RMSNorm over the whole q projection (``hidden_size``
channels) and ``k_norm`` one over the whole k projection, before RoPE:
``qk_layernorm`` with ``qk_norm_scope='full'``. transformers sizes those norms
from ``hidden_size`` whatever ``head_dim`` says, so a ``head_dim`` other than
``hidden_size / num_attention_heads`` is refused. ``clip_qkv`` clamps q, k and
v, which megatron cannot do; ``attention_bias`` biases q/k/v and ``o_proj`` but
not the MLP, which megatron's ``add_bias_linear`` cannot express. Every layer is
MoE; ``norm_topk_prob`` translates as for Qwen3-MoE.
"""

from __future__ import annotations

from typing import Any

from plugtron.conversion import ConfigReader, ConfigSchema, direct

from .adapter import GPTAdapter
from .architecture import Fields
from .llama import LLAMA, read_decoder, write_decoder
from .qwen3_moe import MOE_TYPES, derive_experts, expert_rules, moe_table, read_moe, write_moe
from .rope import need_value

_LAYER = "decoder.layers.{i}."

ATTENTION = (LLAMA.table
             .replace(_LAYER + "self_attention.q_layernorm.weight",
                      lambda r: direct("model.layers.{i}.self_attn.q_norm.weight", r.megatron, ("Q",), r.when))
             .replace(_LAYER + "self_attention.k_layernorm.weight",
                      lambda r: direct("model.layers.{i}.self_attn.k_norm.weight", r.megatron, ("KV",), r.when)))


def _derive(values: dict[str, Any]) -> None:
    derive_experts("num_experts", "num_local_experts")(values)
    if values["num_key_value_heads"] is None:
        values["num_key_value_heads"] = values["num_attention_heads"]


def _read(k: ConfigReader) -> Fields:
    if k.get("attention_bias"):
        raise k.fail("attention_bias", "OLMoE biases q/k/v and o_proj but not the MLP, which megatron cannot express")
    if k.get("clip_qkv") is not None:
        raise k.fail("clip_qkv", f"is {k.get('clip_qkv')}; megatron cannot clamp the q/k/v activations")
    hidden, heads = k.get("hidden_size"), k.get("num_attention_heads")
    head_dim = k.get("head_dim")  # not an OlmoeConfig field; its attention reads it when present
    if head_dim is not None and head_dim * heads != hidden:
        raise k.fail("head_dim", f"is {head_dim}; OLMoE's q/k norms are hidden_size ({hidden}) wide, so it must be "
                                 f"hidden_size / num_attention_heads")
    fields = read_decoder(k, add_bias_linear=False, add_qkv_bias=False, qk_layernorm=True)
    fields = read_moe(k, {**fields, "qk_norm_scope": "full"}, experts_key="num_experts", alias="num_local_experts",
                      ffn_key="intermediate_size")
    return fields


def _write(f: Fields) -> dict[str, Any]:
    arch = OLMOE.name
    need_value(f, "add_bias_linear", (False,), arch, True)
    need_value(f, "add_qkv_bias", (False,), arch, False)
    need_value(f, "qk_norm_scope", ("full",), arch, "head")
    if f.get("kv_channels") not in (None, f["hidden_size"] // f["num_attention_heads"]):
        need_value(f, "kv_channels", (f["hidden_size"] // f["num_attention_heads"],), arch)
    moe = write_moe(f, arch, experts_key="num_experts", ffn_key="intermediate_size", sparse_keys=False)
    return {**write_decoder(f, arch, qk_layernorm=True), "attention_bias": False, "clip_qkv": None, **moe}


OLMOE = LLAMA.derive(
    name="OlmoeForCausalLM", model_type="olmoe", config_class="OlmoeConfig", read=_read, write=_write,
    table=moe_table(ATTENTION, expert_rules()),
    schema=ConfigSchema(
        defaults={"vocab_size": 50304, "hidden_size": 2048, "intermediate_size": 2048, "num_hidden_layers": 16,
                  "num_attention_heads": 16, "num_key_value_heads": None, "hidden_act": "silu",
                  "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                  "attention_bias": False, "clip_qkv": None, "num_experts_per_tok": 8, "num_experts": 64,
                  "output_router_logits": False, "router_aux_loss_coef": 0.01, "norm_topk_prob": False},
        types={**MOE_TYPES, "clip_qkv": "a float or null"}, derive=_derive),
    expresses=frozenset({"num_moe_experts", "qk_norm_scope"}))

ADAPTER = GPTAdapter(OLMOE)
