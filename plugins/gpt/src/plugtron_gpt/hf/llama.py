"""``LlamaForCausalLM``: the table and config translation most decoder architectures derive from.

Llama is a pre-norm decoder: RMSNorm, RoPE, grouped-query attention with
separate q/k/v projections, a gated (SwiGLU) MLP, optionally untied output.
The helpers :func:`read_decoder` and :func:`write_decoder` are the reusable
halves of its config translation; Mistral, Qwen2, Qwen3 and third-party
Llama-likes call them with their own biases, norms and MLP kind. The window
helpers (:func:`window_fields`, :func:`windowed_layers` ...) translate HF
sliding windows to megatron's ``window_size`` / ``window_attn_skip_freq`` and
back; Llama itself has no window (its modeling ignores ``sliding_window``), so
it still refuses an active one (:func:`reject_sliding_window`).
"""

from __future__ import annotations

from typing import Any

from plugtron.conversion import (ConfigReader, ConfigSchema, UnsupportedConfigError, direct, gated_fc1, grouped_qkv,
                                 layer, table, vocab_rows)

from .adapter import GPTAdapter
from .architecture import Fields, HFArchitecture
from .rope import DEFAULT_ROPE_THETA, need_value, rope_fields_from_hf, rope_parameters_to_hf

SILU = "torch.nn.functional:silu"
GELU = "torch.nn.functional:gelu"
RELU = "torch.nn.functional:relu"
GELU_TANH = "plugtron.activations:gelu_tanh"
SQUARED_RELU = "megatron.core.activations:squared_relu"
#: HF activation names -> allowlisted megatron activation functions.
ACTIVATIONS = {"silu": SILU, "swish": SILU, "gelu": GELU, "relu": RELU, "gelu_new": GELU_TANH,
               "gelu_pytorch_tanh": GELU_TANH, "relu2": SQUARED_RELU}
#: The reverse, the names the Llama-like config classes accept.
HF_ACTIVATIONS = {SILU: "silu", GELU: "gelu", RELU: "relu", GELU_TANH: "gelu_pytorch_tanh", SQUARED_RELU: "relu2"}
#: HF ``layer_types`` entries (transformers' names).
FULL, SLIDING = "full_attention", "sliding_attention"
#: The megatron fields of sliding-window attention (for ``HFArchitecture.expresses``).
WINDOW = frozenset({"window_size", "window_attn_skip_freq"})

#: Decoder tensors under ``model.layers.{i}.``; ``{in_w}`` / ``{mlp_w}`` are the layer spec's norm names.
DECODER_LAYER = [
    direct("input_layernorm.weight", "{in_w}", ("H",)),
    grouped_qkv("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                "self_attention.linear_qkv.weight", ("Q", "H"), ("KV", "H")),
    grouped_qkv("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",
                "self_attention.linear_qkv.bias", ("Q",), ("KV",), when=("add_bias_linear", "add_qkv_bias")),
    direct("self_attn.q_norm.weight", "self_attention.q_layernorm.weight", ("D",), when="qk_layernorm"),
    direct("self_attn.k_norm.weight", "self_attention.k_layernorm.weight", ("D",), when="qk_layernorm"),
    direct("self_attn.o_proj.weight", "self_attention.linear_proj.weight", ("H", "Q")),
    direct("self_attn.o_proj.bias", "self_attention.linear_proj.bias", ("H",), when="add_bias_linear"),
    direct("post_attention_layernorm.weight", "{mlp_w}", ("H",)),
    gated_fc1("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.linear_fc1.weight", ("F", "H")),
    gated_fc1("mlp.gate_proj.bias", "mlp.up_proj.bias", "mlp.linear_fc1.bias", ("F",), when="add_bias_linear"),
    direct("mlp.down_proj.weight", "mlp.linear_fc2.weight", ("H", "F")),
    direct("mlp.down_proj.bias", "mlp.linear_fc2.bias", ("H",), when="add_bias_linear"),
]

#: LayerNorm biases of the Llama-likes that use LayerNorm (StableLM, StarCoder2, Nemotron): same names, ``.bias``.
LAYERNORM_BIASES = table(
    direct("model.norm.bias", "decoder.final_layernorm.bias", ("H",)),
    layer("model.layers.{i}.", [direct("input_layernorm.bias", "{in_b}", ("H",)),
                                direct("post_attention_layernorm.bias", "{mlp_b}", ("H",))]),
)

TABLE = table(
    vocab_rows("model.embed_tokens.weight", "embedding.word_embeddings.weight"),
    direct("model.norm.weight", "decoder.final_layernorm.weight", ("H",)),
    vocab_rows("lm_head.weight", "output_layer.weight", when="not share_embeddings_and_output_weights"),
    layer("model.layers.{i}.", DECODER_LAYER),
)

DEFAULTS = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "hidden_act": "silu",
            "rms_norm_eps": 1e-6, "tie_word_embeddings": False}


def derive_heads(values: dict[str, Any]) -> None:
    """transformers' derivations: ``head_dim`` from the width, ``num_key_value_heads`` from the heads."""
    if values.get("head_dim") is None:
        values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]
    if values.get("num_key_value_heads") is None:
        values["num_key_value_heads"] = values["num_attention_heads"]


def _derive_llama(values: dict[str, Any]) -> None:
    """LlamaConfig refuses a width its heads do not divide, even with an explicit ``head_dim``."""
    if values["num_attention_heads"] and values["hidden_size"] % values["num_attention_heads"]:
        raise UnsupportedConfigError("hidden_size", f"{values['hidden_size']} is not a multiple of "
                                     f"num_attention_heads {values['num_attention_heads']}")
    derive_heads(values)


def activation(k: ConfigReader, key: str = "hidden_act") -> str:
    name = k.get(key)
    if name not in ACTIVATIONS:
        raise k.fail(key, f"activation {name!r} is not one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def reject_sliding_window(k: ConfigReader, num_layers: int) -> None:
    """Refuse an active sliding window in a config whose architecture has none (Llama); ``null`` passes."""
    k.mark("use_sliding_window", "max_window_layers")
    layer_types_of(k, num_layers)
    window = k.get("sliding_window")
    if window is not None:
        raise k.fail("sliding_window", f"sliding-window attention (window {window}) is active and not supported")


def layer_types_of(k: ConfigReader, num_layers: int, key: str = "layer_types") -> list[str] | None:
    """``layer_types`` as transformers resolved it, checked: one full/sliding entry per layer (or None)."""
    types = k.get(key)
    if types is not None and (not isinstance(types, list) or len(types) != num_layers or set(types) - {FULL, SLIDING}):
        raise k.fail(key, f"{types!r:.200} must list {FULL}/{SLIDING} for each of the {num_layers} layers")
    return types


def window_fields(k: ConfigReader, window: Any, windowed: list[bool], key: str = "sliding_window") -> Fields:
    """megatron's sliding-window fields for HF ``sliding_window`` ``window`` on the ``windowed`` layers.

    HF's window W lets query i see keys ``i - W < j <= i``; megatron's
    ``window_size = (left, 0)`` lets it see ``i - left <= j <= i``: so
    ``left = W - 1``. ``window_attn_skip_freq`` is megatron's per-layer
    list (1 = windowed), left out when every layer is windowed. A window on
    no layer is no window.
    """
    if window is None or not any(windowed):
        return {}
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise k.fail(key, f"is {window!r}; a sliding window must be a positive number of tokens")
    return {"window_size": [window - 1, 0], "window_attn_skip_freq": None if all(windowed) else [int(w) for w in windowed]}


def windowed_layers(f: Fields, arch: str) -> tuple[int | None, list[bool]]:
    """The HF window (or None) and which layers use it, from megatron's fields (the reverse of :func:`window_fields`).

    ``window_attn_skip_freq`` is read as megatron reads it: None = every
    layer, an int N = every layer whose 1-based number is not a multiple of N,
    a list = 1 per windowed layer.
    """
    num_layers, window, skip = f["num_layers"], f.get("window_size"), f.get("window_attn_skip_freq")
    if window is None:
        return None, [False] * num_layers
    left, right = window
    if right != 0 or left < 0:
        raise UnsupportedConfigError("window_size", f"is {tuple(window)}; {arch} has causal windows only, (left >= 0, 0)")
    if skip is None:
        return left + 1, [True] * num_layers
    if isinstance(skip, int) and not isinstance(skip, bool):
        return left + 1, [(i + 1) % skip != 0 for i in range(num_layers)]
    if len(skip) != num_layers:
        raise UnsupportedConfigError("window_attn_skip_freq", f"has {len(skip)} entries for {num_layers} layers")
    windowed = [bool(v) for v in skip]
    return (left + 1 if any(windowed) else None), windowed


def uniform_window_to_hf(f: Fields, arch: str) -> int | None:
    """HF ``sliding_window`` of an architecture that windows every layer or none (Mistral, StarCoder2, Phi-3)."""
    window, windowed = windowed_layers(f, arch)
    if window is not None and not all(windowed):
        raise UnsupportedConfigError("window_attn_skip_freq", f"is {f.get('window_attn_skip_freq')!r}; {arch} applies "
                                     "its sliding window to every layer or none")
    return window


def read_uniform_window(k: ConfigReader, num_layers: int) -> Fields:
    """``sliding_window`` on every layer, as Mistral, StarCoder2 and Phi-3 apply it (they have no ``layer_types``)."""
    return window_fields(k, k.get("sliding_window"), [True] * num_layers)


def read_decoder(k: ConfigReader, *, add_bias_linear: bool, add_qkv_bias: bool, qk_layernorm: bool,
                 partial_rotary: bool = False, partial_rotary_default: float | None = None,
                 normalization: str = "RMSNorm", eps_key: str = "rms_norm_eps", gated: bool = True,
                 rope_theta_default: float = DEFAULT_ROPE_THETA) -> Fields:
    """The fields every Llama-like config shares (sizes, norm, MLP, RoPE), biases and norms as given.

    Defaults are Llama's (RMSNorm under ``rms_norm_eps``, a gated MLP);
    LayerNorm architectures pass their ``normalization`` and ``eps_key``,
    plain-MLP ones ``gated=False``; ``rope_theta_default`` is the class's ``default_theta``.
    """
    hidden, heads = k.get("hidden_size"), k.get("num_attention_heads")
    head_dim = k.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise k.fail("head_dim", f"missing and hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        head_dim = hidden // heads
    max_pos = k.get("max_position_embeddings")
    fields = {
        "num_layers": k.get("num_hidden_layers"), "hidden_size": hidden, "ffn_hidden_size": k.get("intermediate_size"),
        "num_attention_heads": heads, "num_query_groups": k.get("num_key_value_heads") or heads, "kv_channels": head_dim,
        "layernorm_epsilon": float(k.get(eps_key)), "normalization": normalization,
        "activation": activation(k), "gated_linear_unit": gated,
        "add_bias_linear": add_bias_linear, "add_qkv_bias": add_qkv_bias, "qk_layernorm": qk_layernorm,
        "vocab_size": k.get("vocab_size"), "seq_length": max_pos,
        "share_embeddings_and_output_weights": bool(k.get("tie_word_embeddings")),
    }
    fields.update(rope_fields_from_hf(k.raw, k.fail, max_pos, k.architecture, partial_rotary=partial_rotary,
                                      partial_rotary_default=partial_rotary_default,
                                      rope_theta_default=rope_theta_default))
    return fields


def write_decoder(f: Fields, arch: str, *, qk_layernorm: bool, partial_rotary: bool = False,
                  normalization: str = "RMSNorm", eps_key: str = "rms_norm_eps", gated: bool = True) -> dict[str, Any]:
    """Config-class keywords every Llama-like shares; biases are the caller's (they differ most)."""
    hidden, heads = f["hidden_size"], f["num_attention_heads"]
    act = need_value(f, "activation", tuple(HF_ACTIVATIONS), arch, GELU)
    need_value(f, "normalization", (normalization,), arch, "LayerNorm")
    need_value(f, "gated_linear_unit", (gated,), arch, False)
    need_value(f, "position_embedding_type", ("rope", "yarn"), arch, "learned_absolute")
    need_value(f, "qk_layernorm", (qk_layernorm,), arch, False)
    return dict(
        vocab_size=f["vocab_size"], hidden_size=hidden, intermediate_size=f.get("ffn_hidden_size") or 4 * hidden,
        num_hidden_layers=f["num_layers"], num_attention_heads=heads,
        num_key_value_heads=f.get("num_query_groups") or heads, hidden_act=HF_ACTIVATIONS[act],
        max_position_embeddings=f["seq_length"], **{eps_key: f.get("layernorm_epsilon", 1e-5)},
        tie_word_embeddings=bool(f.get("share_embeddings_and_output_weights", True)),
        rope_parameters=rope_parameters_to_hf(f, arch, partial_rotary=partial_rotary))


def single_bias_switch(f: Fields, arch: str) -> bool:
    """Architectures with one switch for every linear bias (ERNIE 4.5's ``use_bias``, Nemotron's attention and MLP
    biases): ``add_bias_linear``, and no q/k/v bias without it; the switch's value."""
    bias = need_value(f, "add_bias_linear", (True, False), arch, True)
    if not bias:
        need_value(f, "add_qkv_bias", (False,), arch, False)
    return bias


def head_dim_of(f: Fields) -> int:
    return f.get("kv_channels") or f["hidden_size"] // f["num_attention_heads"]


def _read(k: ConfigReader) -> Fields:
    attn_bias, mlp_bias = bool(k.get("attention_bias")), bool(k.get("mlp_bias"))
    if attn_bias != mlp_bias:
        raise k.fail("mlp_bias", f"is {mlp_bias} while attention_bias is {attn_bias}; megatron's add_bias_linear sets both")
    reject_sliding_window(k, k.get("num_hidden_layers"))
    return read_decoder(k, add_bias_linear=attn_bias, add_qkv_bias=attn_bias, qk_layernorm=False)


def _write(f: Fields) -> dict[str, Any]:
    bias = f.get("add_bias_linear", True)
    if not bias:  # megatron's qkv has a bias if either flag is set; Llama needs all or none
        need_value(f, "add_qkv_bias", (False,), LLAMA.name, False)
    return {**write_decoder(f, LLAMA.name, qk_layernorm=False), "head_dim": head_dim_of(f),
            "attention_bias": bool(bias), "mlp_bias": bool(bias)}


LLAMA = HFArchitecture(
    name="LlamaForCausalLM", model_type="llama", config_class="LlamaConfig",
    schema=ConfigSchema(
        defaults={**DEFAULTS, "vocab_size": 32000, "intermediate_size": 11008, "num_key_value_heads": None,
                  "max_position_embeddings": 2048, "attention_bias": False, "mlp_bias": False, "head_dim": None},
        derive=_derive_llama,
        non_numeric=frozenset({"pretraining_tp"}),  # transformers 5 modeling ignores it
        # nanotron exports (SmolLM2): a marker, and the rotate-half RoPE layout HF Llama uses anyway.
        harmless_at={"is_llama_config": True, "rope_interleaved": False}),
    read=_read, write=_write, table=TABLE)

ADAPTER = GPTAdapter(LLAMA)
