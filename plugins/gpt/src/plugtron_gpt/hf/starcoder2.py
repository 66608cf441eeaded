"""``Starcoder2ForCausalLM``: Llama's attention with biases everywhere, LayerNorm, a plain GeLU MLP, a sliding window.

``use_bias`` puts a bias on q/k/v, o_proj, c_fc and c_proj alike (megatron's
``add_bias_linear``); the norms are LayerNorms with biases under
``norm_epsilon``; the MLP is ``c_proj(act(c_fc(x)))`` (not gated,
``gelu_pytorch_tanh`` by default); ``sliding_window`` applies to every layer
(megatron's ``window_size``, no per-layer list).
"""

from __future__ import annotations

from typing import Any

from plugtron.conversion import BOOL, FLOAT, INT, ConfigReader, ConfigSchema, direct, layer

from .adapter import GPTAdapter
from .architecture import Fields, HFArchitecture
from .llama import (LAYERNORM_BIASES, TABLE, WINDOW, head_dim_of, read_decoder, read_uniform_window,
                    uniform_window_to_hf, write_decoder)
from .rope import need_value

LAYOUT = {"normalization": "LayerNorm", "eps_key": "norm_epsilon", "gated": False}
_LLAMA_ONLY = ("self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight", "mlp.linear_fc1.weight",
               "mlp.linear_fc1.bias", "mlp.linear_fc2.weight", "mlp.linear_fc2.bias")

MLP = layer("model.layers.{i}.", [
    direct("mlp.c_fc.weight", "mlp.linear_fc1.weight", ("F", "H")),
    direct("mlp.c_fc.bias", "mlp.linear_fc1.bias", ("F",), when="add_bias_linear"),
    direct("mlp.c_proj.weight", "mlp.linear_fc2.weight", ("H", "F")),
    direct("mlp.c_proj.bias", "mlp.linear_fc2.bias", ("H",), when="add_bias_linear"),
])


def _read(k: ConfigReader) -> Fields:
    bias = bool(k.get("use_bias"))
    fields = read_decoder(k, add_bias_linear=bias, add_qkv_bias=bias, qk_layernorm=False, **LAYOUT)
    return {**fields, **read_uniform_window(k, fields["num_layers"])}


def _write(f: Fields) -> dict[str, Any]:
    arch = STARCODER2.name
    bias = need_value(f, "add_bias_linear", (True, False), arch, True)
    need_value(f, "add_qkv_bias", (bias,) if bias else (False,), arch, False)
    out = {**write_decoder(f, arch, qk_layernorm=False, **LAYOUT), "use_bias": bias,
           "sliding_window": uniform_window_to_hf(f, arch)}
    if head_dim_of(f) != f["hidden_size"] // f["num_attention_heads"]:
        out["head_dim"] = head_dim_of(f)
    return out


STARCODER2 = HFArchitecture(
    name="Starcoder2ForCausalLM", model_type="starcoder2", config_class="Starcoder2Config", read=_read, write=_write,
    table=TABLE.without(*("decoder.layers.{i}." + n for n in _LLAMA_ONLY)) + MLP + LAYERNORM_BIASES,
    expresses=WINDOW,
    schema=ConfigSchema(
        defaults={"vocab_size": 49152, "hidden_size": 3072, "intermediate_size": 12288, "num_hidden_layers": 30,
                  "num_attention_heads": 24, "num_key_value_heads": 2, "hidden_act": "gelu_pytorch_tanh",
                  "max_position_embeddings": 4096, "norm_epsilon": 1e-5, "sliding_window": None, "use_bias": True,
                  "tie_word_embeddings": True},
        types={"num_key_value_heads": INT, "norm_epsilon": FLOAT, "use_bias": BOOL},
        non_numeric=frozenset({"residual_dropout", "embedding_dropout"}),
        # BigCode's published files (starcoder2-3b/7b/15b) carry training-code keys transformers' Starcoder2
        # never reads; accepted at the values that describe the model it builds, refused otherwise.
        harmless_at={"mlp_type": "default", "norm_type": "layer_norm"}))

ADAPTER = GPTAdapter(STARCODER2)
