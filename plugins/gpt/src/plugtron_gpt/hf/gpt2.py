"""``GPT2LMHeadModel``: learned positions, LayerNorm with biases, ``Conv1D`` weights stored ``[in, out]``."""

from __future__ import annotations

from typing import Any

from plugtron.conversion import ConfigReader, ConfigSchema, direct, layer, table, transposed, transposed_qkv, vocab_rows

from .adapter import GPTAdapter
from .architecture import Fields, HFArchitecture
from .llama import GELU, GELU_TANH, RELU, SILU, activation
from .rope import need_value

_HF_ACTIVATIONS = {GELU_TANH: "gelu_new", GELU: "gelu", RELU: "relu", SILU: "silu"}

TABLE = table(
    vocab_rows("transformer.wte.weight", "embedding.word_embeddings.weight"),
    direct("transformer.wpe.weight", "embedding.position_embeddings.weight", ("P", "H")),
    direct("transformer.ln_f.weight", "decoder.final_layernorm.weight", ("H",)),
    direct("transformer.ln_f.bias", "decoder.final_layernorm.bias", ("H",)),
    vocab_rows("lm_head.weight", "output_layer.weight", when="not share_embeddings_and_output_weights"),
    layer("transformer.h.{i}.", [
        direct("ln_1.weight", "{in_w}", ("H",)),
        direct("ln_1.bias", "{in_b}", ("H",)),
        transposed_qkv("attn.c_attn.weight", "self_attention.linear_qkv.weight", ("H", "Q3")),
        transposed_qkv("attn.c_attn.bias", "self_attention.linear_qkv.bias", ("Q3",)),
        transposed("attn.c_proj.weight", "self_attention.linear_proj.weight", ("H", "H")),
        direct("attn.c_proj.bias", "self_attention.linear_proj.bias", ("H",)),
        direct("ln_2.weight", "{mlp_w}", ("H",)),
        direct("ln_2.bias", "{mlp_b}", ("H",)),
        transposed("mlp.c_fc.weight", "mlp.linear_fc1.weight", ("H", "F")),
        direct("mlp.c_fc.bias", "mlp.linear_fc1.bias", ("F",)),
        transposed("mlp.c_proj.weight", "mlp.linear_fc2.weight", ("F", "H")),
        direct("mlp.c_proj.bias", "mlp.linear_fc2.bias", ("H",)),
    ]),
)


def _read(k: ConfigReader) -> Fields:
    hidden, heads = k.get("n_embd"), k.get("n_head")
    if hidden % heads:
        raise k.fail("n_head", f"{heads} does not divide n_embd {hidden}")
    for key, needed in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False)):
        if bool(k.get(key)) != needed:
            raise k.fail(key, f"must be {needed} (megatron scales attention by 1/sqrt(head_dim) and has no cross-attention)")
    return {
        "num_layers": k.get("n_layer"), "hidden_size": hidden, "ffn_hidden_size": k.get("n_inner") or 4 * hidden,
        "num_attention_heads": heads, "num_query_groups": heads, "kv_channels": hidden // heads,
        "layernorm_epsilon": float(k.get("layer_norm_epsilon")), "normalization": "LayerNorm",
        "activation": activation(k, "activation_function"), "gated_linear_unit": False,
        "add_bias_linear": True, "add_qkv_bias": True, "qk_layernorm": False,
        "vocab_size": k.get("vocab_size"), "seq_length": k.get("n_positions"),
        "position_embedding_type": "learned_absolute",
        "share_embeddings_and_output_weights": bool(k.get("tie_word_embeddings")),
    }


def _write(f: Fields) -> dict[str, Any]:
    arch = GPT2.name
    hidden, heads = f["hidden_size"], f["num_attention_heads"]
    ffn = f.get("ffn_hidden_size") or 4 * hidden
    act = need_value(f, "activation", tuple(_HF_ACTIVATIONS), arch, GELU)
    need_value(f, "normalization", ("LayerNorm",), arch, "LayerNorm")
    need_value(f, "gated_linear_unit", (False,), arch, False)
    need_value(f, "position_embedding_type", ("learned_absolute",), arch, "learned_absolute")
    need_value(f, "add_bias_linear", (True,), arch, True)
    need_value(f, "qk_layernorm", (False,), arch, False)
    need_value(f, "num_query_groups", (None, heads), arch)
    need_value(f, "kv_channels", (None, hidden // heads), arch)
    return dict(vocab_size=f["vocab_size"], n_positions=f["seq_length"], n_embd=hidden, n_layer=f["num_layers"],
                n_head=heads, n_inner=None if ffn == 4 * hidden else ffn, activation_function=_HF_ACTIVATIONS[act],
                layer_norm_epsilon=f.get("layernorm_epsilon", 1e-5),
                tie_word_embeddings=bool(f.get("share_embeddings_and_output_weights", True)))


GPT2 = HFArchitecture(
    name="GPT2LMHeadModel", model_type="gpt2", config_class="GPT2Config",
    schema=ConfigSchema(
        defaults={"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
                  "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "scale_attn_weights": True,
                  "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False, "tie_word_embeddings": True},
        non_numeric=frozenset({"resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_type", "summary_use_proj",
                               "summary_activation", "summary_proj_to_labels", "summary_first_dropout", "n_ctx",
                               "reorder_and_upcast_attn"})),  # a precision detail (fp32 softmax), not a different function
    read=_read, write=_write, table=TABLE)

ADAPTER = GPTAdapter(GPT2)
