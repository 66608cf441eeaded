"""``Gemma2ForCausalLM``: Gemma with sandwich norms, soft-capping and alternating sliding windows.

What Gemma 2 adds to Gemma, and the megatron field for each:

* four norms per layer: ``input_layernorm`` (pre-attention),
  ``post_attention_layernorm`` (on the attention output, before the residual
  add: a *post* norm, unlike Llama's tensor of the same name, which is the
  pre-MLP norm), ``pre_feedforward_layernorm`` (megatron's pre-MLP norm) and
  ``post_feedforward_layernorm``: ``norm_placement = "sandwich"``;
* ``query_pre_attn_scalar``: softmax scale ``q ** -0.5`` instead of
  ``head_dim ** -0.5`` (``softmax_scale``);
* ``attn_logit_softcapping`` / ``final_logit_softcapping``:
  ``cap * tanh(x / cap)`` on attention scores / output logits
  (``attention_softcap`` / ``final_logit_softcap``);
* ``layer_types`` + ``sliding_window``: sliding-window attention on the layers
  typed ``sliding_attention`` (``window_size = [W - 1, 0]``, HF's window
  counts the query itself) chosen by ``window_attn_skip_freq``.

The activation key is ``hidden_activation``; published files also carry a
``hidden_act`` that transformers 5 ignores, accepted only when the two agree.
"""

from __future__ import annotations

from typing import Any

from plugtron.conversion import INT, OPT_FLOAT, ConfigReader, ConfigSchema, UnsupportedConfigError, direct, layer

from .adapter import GPTAdapter
from .architecture import Fields
from .gemma import GEMMA, GEMMA_EXPRESSES, read_gemma, write_gemma
from .llama import (FULL, HF_ACTIVATIONS, SLIDING, WINDOW, activation, head_dim_of, layer_types_of, window_fields,
                    windowed_layers)
from .rope import need_value

#: megatron's names of the two post norms (``norm_placement = "sandwich"``), under ``decoder.layers.{i}.``.
POST_ATTENTION_NORM = "post_attention_layernorm.weight"
POST_MLP_NORM = "post_mlp_layernorm.weight"

GEMMA2_EXPRESSES = GEMMA_EXPRESSES | WINDOW | {"softmax_scale", "attention_softcap", "final_logit_softcap",
                                               "norm_placement"}

#: Gemma's table with the pre-MLP norm renamed and the two post norms added.
TABLE = GEMMA.table.renamed({"post_attention_layernorm": "pre_feedforward_layernorm"}) + layer("model.layers.{i}.", [
    direct("post_attention_layernorm.weight", POST_ATTENTION_NORM, ("H",)),
    direct("post_feedforward_layernorm.weight", POST_MLP_NORM, ("H",)),
])


# -- sliding windows -----------------------------------------------------------------------
def compact_skip_freq(windowed: list[bool]) -> int | list[int] | None:
    """megatron's ``window_attn_skip_freq`` for per-layer window flags, in the shortest form that says it.

    None: every layer windowed; N: every layer whose 1-based number is not a
    multiple of N (Gemma 2: 2, Gemma 3: 6), as megatron reads an int; else
    one 0/1 entry per layer.
    """
    if all(windowed):
        return None
    for n in range(2, len(windowed) + 1):
        if windowed == [(i + 1) % n != 0 for i in range(len(windowed))]:
            return n
    return [int(w) for w in windowed]


def read_window(k: ConfigReader) -> Fields:
    """``window_size`` / ``window_attn_skip_freq`` from ``layer_types`` (derived when absent) and ``sliding_window``."""
    layers = k.get("num_hidden_layers")
    windowed = [t == SLIDING for t in layer_types_of(k, layers)]
    window = k.get("sliding_window")
    if any(windowed) and window is None:
        raise k.fail("sliding_window", f"is null while layer_types has {SLIDING} layers")
    fields = window_fields(k, window, windowed)
    if fields:
        fields["window_attn_skip_freq"] = compact_skip_freq(windowed)
    return fields


def write_window(f: Fields, arch: str) -> dict[str, Any]:
    window, windowed = windowed_layers(f, arch)
    return {"sliding_window": window, "layer_types": [SLIDING if w else FULL for w in windowed]}


# -- scale and caps ------------------------------------------------------------------------
def read_scale_and_caps(k: ConfigReader, *, attention_cap: bool = True) -> Fields:
    scalar = k.get("query_pre_attn_scalar")
    if scalar <= 0:
        raise k.fail("query_pre_attn_scalar", f"is {scalar}; the softmax scale is its inverse square root")
    out = {"softmax_scale": float(scalar) ** -0.5}
    keys = {"final_logit_softcapping": "final_logit_softcap"}
    if attention_cap:
        keys["attn_logit_softcapping"] = "attention_softcap"
    for key, name in keys.items():
        cap = k.get(key)
        if cap is not None and not cap > 0:
            raise k.fail(key, f"is {cap}; transformers divides by it (only null or a positive cap is defined)")
        out[name] = cap
    return out


def query_pre_attn_scalar_of(f: Fields, arch: str) -> int:
    """The integer ``q`` with ``q ** -0.5 == softmax_scale`` (megatron's default scale: ``head_dim``)."""
    scale = f.get("softmax_scale")
    if scale is None:
        return head_dim_of(f)
    scalar = round(scale ** -2) if scale > 0 else 0
    if scalar < 1 or float(scalar) ** -0.5 != scale:
        raise UnsupportedConfigError("softmax_scale", f"is {scale!r}; {arch} stores the scale as an integer "
                                     "query_pre_attn_scalar q (scale q ** -0.5) and no integer gives this one")
    return scalar


def check_activation_keys(k: ConfigReader) -> None:
    """A published ``hidden_act`` next to ``hidden_activation`` (transformers 5 reads only the latter) must agree."""
    legacy = k.raw("hidden_act")
    if legacy is not None and legacy != k.values["hidden_activation"]:
        raise k.fail("hidden_act", f"is {legacy!r} while hidden_activation is {k.values['hidden_activation']!r}; "
                     "refusing to guess which one the checkpoint was trained with")


def read_gemma2(k: ConfigReader, *, qk_layernorm: bool = False, attention_cap: bool = True) -> Fields:
    check_activation_keys(k)
    activation(k, "hidden_activation")  # refused under its own name; read_decoder then finds it as hidden_act
    fields = read_gemma(k, qk_layernorm=qk_layernorm)
    fields.update(norm_placement="sandwich", **read_scale_and_caps(k, attention_cap=attention_cap), **read_window(k))
    return fields


def write_gemma2(f: Fields, arch: str, *, qk_layernorm: bool = False) -> dict[str, Any]:
    need_value(f, "norm_placement", ("sandwich",), arch, "pre")
    out = write_gemma(f, arch, qk_layernorm=qk_layernorm, activations=tuple(HF_ACTIVATIONS))  # no gelu rewrite here
    out["hidden_activation"] = out.pop("hidden_act")
    out.update(query_pre_attn_scalar=query_pre_attn_scalar_of(f, arch),
               final_logit_softcapping=f.get("final_logit_softcap"),
               attn_logit_softcapping=f.get("attention_softcap"), **write_window(f, arch))
    return out


def derive_gemma2(values: dict[str, Any], pattern: int = 2) -> None:
    """The class's derivations: the width check, ``layer_types`` every ``pattern``-th layer full, activation alias.

    ``hidden_act`` is filled from ``hidden_activation`` only so that
    :func:`~.llama.read_decoder` finds the activation; the file's own
    ``hidden_act`` is checked by :func:`check_activation_keys`.
    """
    if values["num_attention_heads"] and values["hidden_size"] % values["num_attention_heads"]:
        raise UnsupportedConfigError("hidden_size", f"{values['hidden_size']} is not a multiple of "
                                     f"num_attention_heads {values['num_attention_heads']}")
    if values["layer_types"] is None:
        values["layer_types"] = [SLIDING if (i + 1) % pattern else FULL for i in range(values["num_hidden_layers"])]
    values["hidden_act"] = values["hidden_activation"]


def _read(k: ConfigReader) -> Fields:
    return read_gemma2(k)


def _write(f: Fields) -> dict[str, Any]:
    return write_gemma2(f, GEMMA2.name)


GEMMA2_DEFAULTS = {"vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                   "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                   "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
                   "tie_word_embeddings": True, "attention_bias": False, "query_pre_attn_scalar": 256,
                   "sliding_window": 4096, "layer_types": None, "final_logit_softcapping": 30.0,
                   "attn_logit_softcapping": 50.0, "use_bidirectional_attention": None}
GEMMA2_TYPES = {"num_key_value_heads": INT, "head_dim": INT, "query_pre_attn_scalar": INT,
                "final_logit_softcapping": OPT_FLOAT, "attn_logit_softcapping": OPT_FLOAT}
#: Published Gemma 2/3 files name the generation cache layout; it does not change the numbers.
GEMMA2_NON_NUMERIC = frozenset({"cache_implementation"})

GEMMA2 = GEMMA.derive(
    name="Gemma2ForCausalLM", model_type="gemma2", config_class="Gemma2Config", read=_read, write=_write,
    table=TABLE, expresses=GEMMA2_EXPRESSES,
    schema=ConfigSchema(defaults=GEMMA2_DEFAULTS, types=GEMMA2_TYPES, derive=derive_gemma2,
                        non_numeric=GEMMA2_NON_NUMERIC))

ADAPTER = GPTAdapter(GEMMA2)
