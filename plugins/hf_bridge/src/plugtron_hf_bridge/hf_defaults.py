"""The values transformers fills in for keys a ``config.json`` leaves out, without importing transformers.

A ``config.json`` written by ``save_pretrained`` omits keys at their class
default, and a few values are derived when absent (``head_dim``,
``num_key_value_heads``, Qwen's ``layer_types``). Converting must read the
model exactly as transformers will, but importing a transformers config class
costs 1.5-3.5 s on this machine (``transformers.activations`` pulls in torch's
DTensor, dynamo and sympy), more than the whole conversion of a 250M model.
So the defaults of the five built-in architectures' config classes are kept
here as data, with the derivations their constructors apply, and the same
strict types (an ``int`` field refuses ``64.0`` and ``True``, a ``float``
field refuses ``1``).

``tests/hf_bridge/test_hfb_config_defaults.py`` checks every value here against
the installed transformers (transformers 5.23 when written): a transformers
release that changes a default fails that test instead of silently changing
converted models.
"""

from __future__ import annotations

from typing import Any, Callable

from .errors import UnsupportedConfigError

LLAMA, MISTRAL, QWEN2, QWEN3, GPT2 = (
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GPT2LMHeadModel",
)

_LLAMA_LIKE = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "hidden_act": "silu",
               "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
_QWEN = {**_LLAMA_LIKE, "vocab_size": 151936, "intermediate_size": 22016, "num_key_value_heads": 32,
         "max_position_embeddings": 32768, "use_sliding_window": False, "sliding_window": 4096,
         "max_window_layers": 28, "layer_types": None}

#: Class defaults of the keys the converter reads, per architecture.
DEFAULTS: dict[str, dict[str, Any]] = {
    LLAMA: {**_LLAMA_LIKE, "vocab_size": 32000, "intermediate_size": 11008, "num_key_value_heads": None,
            "max_position_embeddings": 2048, "attention_bias": False, "mlp_bias": False, "head_dim": None},
    MISTRAL: {**_LLAMA_LIKE, "vocab_size": 32000, "intermediate_size": 14336, "num_key_value_heads": 8,
              "max_position_embeddings": 4096 * 32, "head_dim": None, "sliding_window": 4096},
    QWEN2: dict(_QWEN),
    QWEN3: {**_QWEN, "head_dim": 128, "attention_bias": False},
    GPT2: {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
           "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "scale_attn_weights": True,
           "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False, "tie_word_embeddings": True},
}

_INT, _OPT_INT, _FLOAT, _BOOL, _STR = "an integer", "an integer or null", "a float", "true or false", "a string"
#: The type each class declares for a key, as its strict validator enforces it.
TYPES: dict[str, str] = {
    **dict.fromkeys(("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings", "max_window_layers", "n_positions", "n_embd", "n_layer", "n_head"),
                    _INT),
    **dict.fromkeys(("num_key_value_heads", "head_dim", "sliding_window", "n_inner"), _OPT_INT),
    **dict.fromkeys(("rms_norm_eps", "layer_norm_epsilon"), _FLOAT),
    **dict.fromkeys(("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window", "scale_attn_weights",
                     "scale_attn_by_inverse_layer_idx", "add_cross_attention"), _BOOL),
    **dict.fromkeys(("hidden_act", "activation_function"), _STR),
}
#: Keys whose declared type differs per class (Qwen3's ``head_dim`` and Mistral's ``num_key_value_heads`` refuse ``None``).
_ARCH_TYPES: dict[str, dict[str, str]] = {QWEN3: {"head_dim": _INT}, MISTRAL: {"num_key_value_heads": _INT}}


def _type_ok(value: Any, kind: str) -> bool:
    if kind == _OPT_INT and value is None:
        return True
    if kind in (_INT, _OPT_INT):
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _FLOAT:
        return isinstance(value, float)
    if kind == _BOOL:
        return isinstance(value, bool)
    return isinstance(value, str)


def _llama_post(values: dict[str, Any]) -> None:
    if values["head_dim"] is None:
        values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]
    if values["num_key_value_heads"] is None:
        values["num_key_value_heads"] = values["num_attention_heads"]


def _qwen_post(values: dict[str, Any]) -> None:
    """The window applies only with ``use_sliding_window``, and then from layer ``max_window_layers`` on."""
    if not values["use_sliding_window"]:
        values["sliding_window"] = None
    if values["num_key_value_heads"] is None:
        values["num_key_value_heads"] = values["num_attention_heads"]
    if values["layer_types"] is None:
        window, first = values["sliding_window"], values["max_window_layers"]
        values["layer_types"] = ["sliding_attention" if window is not None and i >= first else "full_attention"
                                 for i in range(values["num_hidden_layers"])]


_POST: dict[str, Callable[[dict[str, Any]], None]] = {LLAMA: _llama_post, MISTRAL: _llama_post, QWEN2: _qwen_post,
                                                      QWEN3: _qwen_post}


def resolve(arch: str, cfg: dict[str, Any], source: str | None = None) -> dict[str, Any]:
    """``cfg`` with its class's defaults filled in and derived values computed, types checked.

    Keys the class does not declare keep their file value (transformers keeps
    them as plain attributes). Raises :class:`UnsupportedConfigError` naming
    the first key whose value transformers' strict validation would refuse.
    """
    values = {**DEFAULTS[arch], **cfg}
    types = {**TYPES, **_ARCH_TYPES.get(arch, {})}
    for key in DEFAULTS[arch]:
        kind = types.get(key)
        if kind is not None and not _type_ok(values[key], kind):
            raise UnsupportedConfigError(key, f"must be {kind}, not {values[key]!r:.80}", source=source)
    if arch == LLAMA and values["num_attention_heads"] and values["hidden_size"] % values["num_attention_heads"]:
        raise UnsupportedConfigError("hidden_size", f"{values['hidden_size']} is not a multiple of "
                                     f"num_attention_heads {values['num_attention_heads']}", source=source)
    if values.get("num_attention_heads") == 0 or values.get("n_head") == 0:
        raise UnsupportedConfigError("num_attention_heads", "must be positive", source=source)
    post = _POST.get(arch)
    if post is not None:
        post(values)
    return values
