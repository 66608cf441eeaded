"""``GemmaForCausalLM``: Llama's layout with Gemma's three numeric differences.

* The embedding output is multiplied by ``sqrt(hidden_size)``; transformers
  keeps that factor as a float32 buffer and casts it to the activation dtype
  before multiplying (megatron: ``embedding_multiplier`` with
  ``embedding_multiplier_cast``).
* Every RMSNorm scales by ``1 + w`` (megatron's ``layernorm_zero_centered_gamma``).
  The checkpoint stores ``w`` itself and so does megatron, so the weights are
  plain copies: adding or removing the 1 here would double-count it.
* The MLP is GeGLU (``gelu_pytorch_tanh`` gate); transformers rewrites a
  legacy ``hidden_act: "gelu"`` to the tanh form, and so do we.

``head_dim`` is a class field (256) independent of the width, and the output
layer is tied by default. :func:`read_gemma` / :func:`write_gemma` are the
halves Gemma 2 and Gemma 3 build on.
"""

from __future__ import annotations

from typing import Any

from plugtron.conversion import INT, ConfigReader, ConfigSchema, UnsupportedConfigError

from .adapter import GPTAdapter
from .architecture import Fields
from .llama import GELU_TANH, LLAMA, RELU, SILU, head_dim_of, read_decoder, write_decoder
from .rope import need_value

#: Fields every Gemma generation expresses beyond the plain decoder.
GEMMA_EXPRESSES = frozenset({"layernorm_zero_centered_gamma", "embedding_multiplier", "embedding_multiplier_cast"})
#: The activations a Gemma config can carry: GemmaConfig turns exact ``gelu`` into the tanh form.
GEMMA_ACTIVATIONS = (GELU_TANH, SILU, RELU)


def embedding_scale(hidden_size: int) -> float:
    """What transformers multiplies Gemma embeddings by (``hidden_size ** 0.5`` as a Python float)."""
    return hidden_size ** 0.5


def refuse_bidirectional(k: ConfigReader) -> None:
    if k.get("use_bidirectional_attention"):
        raise k.fail("use_bidirectional_attention", f"is {k.get('use_bidirectional_attention')!r}; "
                     "megatron's GPT attention is causal only")


def refuse_attention_bias(k: ConfigReader) -> None:
    if k.get("attention_bias"):
        raise k.fail("attention_bias", "is true: Gemma puts biases on q/k/v and o_proj without MLP biases, "
                     "which megatron's add_qkv_bias / add_bias_linear cannot express")


def read_gemma(k: ConfigReader, *, qk_layernorm: bool = False) -> Fields:
    """Llama's decoder fields plus Gemma's scaled embedding and (1 + w) norms."""
    refuse_bidirectional(k)
    refuse_attention_bias(k)
    fields = read_decoder(k, add_bias_linear=False, add_qkv_bias=False, qk_layernorm=qk_layernorm)
    fields.update(layernorm_zero_centered_gamma=True, embedding_multiplier=embedding_scale(fields["hidden_size"]),
                  embedding_multiplier_cast=True)
    return fields


def check_gemma_fields(f: Fields, arch: str, activations: tuple[str, ...] = GEMMA_ACTIVATIONS) -> None:
    """What every Gemma needs of megatron fields to be written as a Gemma config."""
    need_value(f, "layernorm_zero_centered_gamma", (True,), arch, False)
    need_value(f, "add_bias_linear", (False,), arch, True)
    need_value(f, "add_qkv_bias", (False,), arch, False)
    need_value(f, "activation", activations, arch)
    scale = f.get("embedding_multiplier")
    if scale != embedding_scale(f["hidden_size"]):
        raise UnsupportedConfigError("embedding_multiplier", f"is {scale!r}; {arch} multiplies embeddings by "
                                     f"sqrt(hidden_size) = {embedding_scale(f['hidden_size'])!r}")
    need_value(f, "embedding_multiplier_cast", (True,), arch, False)


def write_gemma(f: Fields, arch: str, *, qk_layernorm: bool = False,
                activations: tuple[str, ...] = GEMMA_ACTIVATIONS) -> dict[str, Any]:
    """Config-class keywords every Gemma shares (the activation under ``hidden_act``)."""
    check_gemma_fields(f, arch, activations)
    return {**write_decoder(f, arch, qk_layernorm=qk_layernorm), "head_dim": head_dim_of(f), "attention_bias": False}


def _derive_gemma(values: dict[str, Any]) -> None:
    """GemmaConfig's one rewrite: the released checkpoints say ``gelu`` and mean the tanh approximation."""
    if values["hidden_act"] == "gelu":
        values["hidden_act"] = "gelu_pytorch_tanh"


def _read(k: ConfigReader) -> Fields:
    fields = read_gemma(k)
    legacy = k.raw("hidden_activation")  # transformers 4.x preferred it; GemmaConfig 5.x ignores it
    if legacy is not None and legacy != k.get("hidden_act"):
        raise k.fail("hidden_activation", f"is {legacy!r} while hidden_act resolves to {k.get('hidden_act')!r}; "
                     "transformers 4 used the former and 5 the latter, refusing to guess")
    return fields


def _write(f: Fields) -> dict[str, Any]:
    return write_gemma(f, GEMMA.name)


GEMMA_DEFAULTS = {"vocab_size": 256000, "hidden_size": 3072, "intermediate_size": 24576, "num_hidden_layers": 28,
                  "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 256,
                  "max_position_embeddings": 8192,
                  "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "attention_bias": False,
                  "use_bidirectional_attention": None}

GEMMA = LLAMA.derive(
    name="GemmaForCausalLM", model_type="gemma", config_class="GemmaConfig", read=_read, write=_write,
    expresses=GEMMA_EXPRESSES,
    schema=ConfigSchema(defaults={**GEMMA_DEFAULTS, "hidden_act": "gelu_pytorch_tanh"},
                        types={"num_key_value_heads": INT, "head_dim": INT}, derive=_derive_gemma))

ADAPTER = GPTAdapter(GEMMA)
