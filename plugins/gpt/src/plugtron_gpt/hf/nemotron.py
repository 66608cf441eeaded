"""``NemotronForCausalLM`` (Nemotron-3/4, Minitron): LayerNorm1P, a squared-ReLU MLP, partial rotary.

* ``NemotronLayerNorm1P`` is a LayerNorm (with bias) that scales by
  ``1 + weight``: megatron's ``layernorm_zero_centered_gamma`` with
  ``normalization: LayerNorm``, for every norm, the final one included; the
  stored weight is the same tensor on both sides.
* The MLP is ``down_proj(relu2(up_proj(x)))``: not gated, ``relu2`` is
  megatron's ``squared_relu``.
* RoPE rotates the leading ``partial_rotary_factor`` of each head (class
  default 0.5), megatron's ``rotary_percent``.
"""

from __future__ import annotations

from typing import Any

from plugtron.conversion import BOOL, ConfigReader, ConfigSchema, direct, layer

from .adapter import GPTAdapter
from .architecture import Fields, HFArchitecture
from .llama import LAYERNORM_BIASES, TABLE, head_dim_of, read_decoder, single_bias_switch, write_decoder
from .rope import need_value, refuse_partial_yarn

LAYOUT = {"normalization": "LayerNorm", "eps_key": "norm_eps", "gated": False}
_LLAMA_ONLY = ("self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight", "mlp.linear_fc1.weight",
               "mlp.linear_fc1.bias")

UP = layer("model.layers.{i}.", [
    direct("mlp.up_proj.weight", "mlp.linear_fc1.weight", ("F", "H")),
    direct("mlp.up_proj.bias", "mlp.linear_fc1.bias", ("F",), when="add_bias_linear"),
])


def _derive(values: dict[str, Any]) -> None:
    """NemotronConfig derives ``head_dim`` only; a missing ``num_key_value_heads`` stays None (refused in ``_read``)."""
    if values.get("head_dim") is None:
        values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]


def _read(k: ConfigReader) -> Fields:
    attn_bias, mlp_bias = bool(k.get("attention_bias")), bool(k.get("mlp_bias"))
    if attn_bias != mlp_bias:
        raise k.fail("mlp_bias", f"is {mlp_bias} while attention_bias is {attn_bias}; megatron's add_bias_linear sets both")
    if k.get("num_key_value_heads") is None:
        raise k.fail("num_key_value_heads", "is null; transformers' Nemotron does not default it and cannot run so")
    nemo_kv_channels = k.raw("kv_channels")  # written by NeMo's exporter; transformers reads head_dim only
    if nemo_kv_channels is not None and nemo_kv_channels != k.get("head_dim"):
        raise k.fail("kv_channels", f"is {nemo_kv_channels} but head_dim is {k.get('head_dim')}; transformers' Nemotron "
                                    "uses head_dim and ignores kv_channels, so the file contradicts itself")
    fields = read_decoder(k, add_bias_linear=attn_bias, add_qkv_bias=attn_bias, qk_layernorm=False,
                          partial_rotary=True, partial_rotary_default=0.5, **LAYOUT)
    refuse_partial_yarn(k, fields)
    return {**fields, "layernorm_zero_centered_gamma": True}


def _write(f: Fields) -> dict[str, Any]:
    arch = NEMOTRON.name
    need_value(f, "layernorm_zero_centered_gamma", (True,), arch, False)
    bias = single_bias_switch(f, arch)
    return {**write_decoder(f, arch, qk_layernorm=False, partial_rotary=True, **LAYOUT), "head_dim": head_dim_of(f),
            "attention_bias": bias, "mlp_bias": bias}


NEMOTRON = HFArchitecture(
    name="NemotronForCausalLM", model_type="nemotron", config_class="NemotronConfig", read=_read, write=_write,
    table=TABLE.without(*("decoder.layers.{i}." + n for n in _LLAMA_ONLY)) + UP + LAYERNORM_BIASES,
    expresses=frozenset({"layernorm_zero_centered_gamma"}),
    schema=ConfigSchema(
        defaults={"vocab_size": 256000, "hidden_size": 6144, "intermediate_size": 24576, "num_hidden_layers": 32,
                  "num_attention_heads": 48, "head_dim": None, "num_key_value_heads": None, "hidden_act": "relu2",
                  "max_position_embeddings": 4096, "norm_eps": 1e-5, "tie_word_embeddings": False,
                  "attention_bias": False, "mlp_bias": False},
        types={"attention_bias": BOOL, "mlp_bias": BOOL}, derive=_derive))

ADAPTER = GPTAdapter(NEMOTRON)
