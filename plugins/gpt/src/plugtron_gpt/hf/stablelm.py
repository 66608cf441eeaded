"""``StableLmForCausalLM``: Llama's layout with LayerNorm (with biases), partial rotary and optional q/k/v biases.

StableLM rotates only ``partial_rotary_factor`` of each head (class default
0.25), megatron's ``rotary_percent``; both rotate the leading channels in the
rotate-half layout. Two StableLM switches have no megatron equivalent and are
refused by name: ``use_parallel_residual`` (GPT-NeoX's ``x + attn(ln(x)) +
mlp(ln(x))``; megatron's layer is sequential) and ``qk_layernorm`` (one
LayerNorm *per head*, each with its own weights; megatron's q/k norm is one
norm shared by every head).
"""

from __future__ import annotations

from typing import Any

from plugtron.conversion import BOOL, INT, ConfigReader, ConfigSchema

from .adapter import GPTAdapter
from .architecture import Fields, HFArchitecture
from .llama import LAYERNORM_BIASES, TABLE, read_decoder, write_decoder
from .rope import need_value, refuse_partial_yarn

NORM = {"normalization": "LayerNorm", "eps_key": "layer_norm_eps"}
QK_NORMS = ("decoder.layers.{i}.self_attention.q_layernorm.weight", "decoder.layers.{i}.self_attention.k_layernorm.weight")


def _read(k: ConfigReader) -> Fields:
    if k.get("use_parallel_residual"):
        raise k.fail("use_parallel_residual", "is true: attention and MLP in parallel from one norm (GPT-NeoX style); "
                                              "megatron's transformer layer runs them in sequence")
    if k.get("qk_layernorm"):
        raise k.fail("qk_layernorm", "is true: StableLM normalises q and k with a separate LayerNorm per head; "
                                     "megatron's q/k norm shares one set of weights across heads")
    hidden, heads = k.get("hidden_size"), k.get("num_attention_heads")
    head_dim = k.get("head_dim")  # StableLM's attention ignores it (hidden_size // heads), its RoPE would not
    if hidden % heads or head_dim not in (None, hidden // heads):
        raise k.fail("head_dim" if head_dim is not None else "hidden_size",
                     f"StableLM needs head_dim = hidden_size / num_attention_heads = {hidden}/{heads}, got {head_dim}")
    qkv_bias = bool(k.get("use_qkv_bias"))
    fields = read_decoder(k, add_bias_linear=False, add_qkv_bias=qkv_bias, qk_layernorm=False, partial_rotary=True,
                          partial_rotary_default=0.25, **NORM)
    refuse_partial_yarn(k, fields)
    return fields


def _write(f: Fields) -> dict[str, Any]:
    arch = STABLELM.name
    need_value(f, "add_bias_linear", (False,), arch, True)
    need_value(f, "kv_channels", (None, f["hidden_size"] // f["num_attention_heads"]), arch)
    return {**write_decoder(f, arch, qk_layernorm=False, partial_rotary=True, **NORM),
            "use_qkv_bias": bool(f.get("add_qkv_bias")), "qk_layernorm": False, "use_parallel_residual": False}


STABLELM = HFArchitecture(
    name="StableLmForCausalLM", model_type="stablelm", config_class="StableLmConfig", read=_read, write=_write,
    table=TABLE.without(*QK_NORMS) + LAYERNORM_BIASES,
    schema=ConfigSchema(
        defaults={"vocab_size": 50304, "intermediate_size": 6912, "hidden_size": 2560, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu",
                  "max_position_embeddings": 4096, "layer_norm_eps": 1e-5, "tie_word_embeddings": False,
                  "use_qkv_bias": False, "qk_layernorm": False, "use_parallel_residual": False},
        types={"num_key_value_heads": INT, "use_qkv_bias": BOOL, "qk_layernorm": BOOL, "use_parallel_residual": BOOL},
        non_numeric=frozenset({"hidden_dropout"})))

ADAPTER = GPTAdapter(STABLELM)
