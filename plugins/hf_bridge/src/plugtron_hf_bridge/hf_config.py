"""Translate HF ``config.json`` dicts to megatron GPT config fields and back.

Field names on the megatron side are megatron-core ``TransformerConfig`` /
``GPTModel`` argument names, so plugtron's GPT config can take them as-is.

The translation is strict on purpose: a config key that changes the model's
numbers but is silently ignored produces a converted model that loads, runs
and is subtly wrong.  So every key of the HF config must either be understood
here or be on :data:`NON_NUMERIC_KEYS`; anything else raises
:class:`UnsupportedConfigError` naming the key.  Missing keys take the
defaults of the transformers config class, exactly as ``AutoConfig`` would
(:mod:`.hf_defaults` holds them, so reading a config never imports transformers;
writing one from megatron fields, :func:`from_megatron_fields`, still does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from plugtron.untrusted import read_json, regular_file_inside

from .errors import CheckpointFormatError, UnsupportedConfigError, checkpoint_errors
from .hf_defaults import GPT2, LLAMA, MISTRAL, QWEN2, QWEN3
from .hf_defaults import resolve as resolve_defaults
from .rope import need_value as _need
from .rope import rope_fields_from_hf, rope_parameters_to_hf

SUPPORTED_ARCHITECTURES: tuple[str, ...] = (LLAMA, MISTRAL, QWEN2, QWEN3, GPT2)
_MODEL_TYPES = {"llama": LLAMA, "mistral": MISTRAL, "qwen2": QWEN2, "qwen3": QWEN3, "gpt2": GPT2}
_CONFIG_CLASSES = {LLAMA: "LlamaConfig", MISTRAL: "MistralConfig", QWEN2: "Qwen2Config", QWEN3: "Qwen3Config", GPT2: "GPT2Config"}

SILU = "torch.nn.functional:silu"
GELU = "torch.nn.functional:gelu"
RELU = "torch.nn.functional:relu"
GELU_TANH = "plugtron.activations:gelu_tanh"
_ACTIVATIONS = {"silu": SILU, "swish": SILU, "gelu": GELU, "relu": RELU, "gelu_new": GELU_TANH, "gelu_pytorch_tanh": GELU_TANH}
_HF_ACT = {LLAMA: {SILU: "silu", GELU: "gelu", RELU: "relu", GELU_TANH: "gelu_pytorch_tanh"},
           GPT2: {GELU_TANH: "gelu_new", GELU: "gelu", RELU: "relu", SILU: "silu"}}

#: HF keys known not to change a causal LM's forward numbers (ids, bookkeeping, generation, dropout).
NON_NUMERIC_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "_name_or_path", "dtype", "torch_dtype",
    "use_cache", "initializer_range", "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id",
    "sep_token_id", "decoder_start_token_id", "output_hidden_states", "output_attentions", "return_dict",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "id2label", "label2id", "problem_type",
    "tokenizer_class", "prefix", "task_specific_params", "finetuning_task", "torchscript", "tie_encoder_decoder",
    "cross_attention_hidden_size", "_attn_implementation", "_commit_hash", "num_labels",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
})
_ARCH_NON_NUMERIC = {
    LLAMA: {"pretraining_tp"},  # transformers 5 modeling ignores it
    GPT2: {"resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_type", "summary_use_proj", "summary_activation",
           "summary_proj_to_labels", "summary_first_dropout", "n_ctx",
           "reorder_and_upcast_attn"},  # a precision detail (fp32 softmax), not a different function
}

#: Keys published config.json files carry at a value that changes nothing; at any other value they are
#: refused by name (``type`` and value must match: ``0`` is not ``false``).
_HARMLESS_AT: dict[str, dict[str, Any]] = {
    # Qwen2.5 (and DeepSeek-R1-Distill-Qwen) configs: multimodal 3-D rotary positions, off.
    QWEN2: {"use_mrope": False},
    # nanotron exports (SmolLM2): a marker, and the rotate-half RoPE layout HF Llama uses anyway.
    LLAMA: {"is_llama_config": True, "rope_interleaved": False},
}

#: megatron fields whose non-default values none of these HF architectures can express.
_MEGATRON_MUST_BE_DEFAULT: dict[str, Any] = {
    "apply_residual_connection_post_layernorm": False, "layernorm_zero_centered_gamma": False,
    "rotary_interleaved": False, "num_moe_experts": None, "multi_latent_attention": False,
    "softmax_scale": None, "window_size": None, "apply_query_key_layer_scaling": False,
}


#: A causal LM's config.json is a few KB; the cap bounds memory for a huge or endless file.
MAX_CONFIG_BYTES = 4 * 2**20


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """Load ``config.json`` from a checkpoint directory (or the file itself).

    Read through :mod:`plugtron.untrusted`: it must be a regular file inside
    its directory (a link to ``/dev/zero`` or out of the directory is refused
    before reading), at most :data:`MAX_CONFIG_BYTES`, JSON without duplicate keys.
    """
    path = Path(path)
    directory, name = (path, "config.json") if path.is_dir() else (path.parent, path.name)
    with checkpoint_errors():
        file = regular_file_inside(directory, name, required=False)
        if file is None:
            raise CheckpointFormatError(directory / name, "config.json not found")
        data = read_json(file, max_bytes=MAX_CONFIG_BYTES, expect=None)
    if not isinstance(data, dict):
        raise CheckpointFormatError(file, "config.json is not a JSON object")
    return data


def architecture_of(hf_config: dict[str, Any], source: str | None = None) -> str:
    """The single supported architecture named by ``architectures`` (or implied by ``model_type``)."""
    archs = hf_config.get("architectures") or []
    if archs:
        found = [a for a in archs if a in SUPPORTED_ARCHITECTURES]
        if len(found) != 1:
            raise UnsupportedConfigError("architectures", f"{archs} must name exactly one of {SUPPORTED_ARCHITECTURES}", source=source)
        arch = found[0]
    elif hf_config.get("model_type") in _MODEL_TYPES:
        arch = _MODEL_TYPES[hf_config["model_type"]]
    else:
        raise UnsupportedConfigError("model_type", f"{hf_config.get('model_type')!r} is not one of {sorted(_MODEL_TYPES)}", source=source)
    model_type = hf_config.get("model_type")
    if model_type is not None and _MODEL_TYPES.get(model_type) != arch:
        raise UnsupportedConfigError("model_type", f"{model_type!r} does not match architecture {arch}", source=source)
    return arch


class _Keys:
    """Config reader that records every key it consumed, so leftovers can be rejected."""

    def __init__(self, cfg: dict[str, Any], arch: str, source: str | None) -> None:
        self.cfg, self.arch, self.source, self.used = cfg, arch, source, set()
        self.values = resolve_defaults(arch, cfg, source)

    def raw(self, key: str) -> Any:
        """The value in the file, or None when absent (no default)."""
        self.used.add(key)
        return self.cfg.get(key)

    def get(self, key: str) -> Any:
        """The value as transformers resolves it (file value, else class default or derived; :mod:`.hf_defaults`)."""
        self.used.add(key)
        return self.values.get(key)

    def fail(self, key: str, problem: str) -> UnsupportedConfigError:
        return UnsupportedConfigError(key, problem, source=self.source)

    def reject_leftovers(self) -> None:
        if self.raw("pruned_heads"):
            raise self.fail("pruned_heads", "pruned attention heads are not supported")
        allowed = NON_NUMERIC_KEYS | _ARCH_NON_NUMERIC.get(self.arch, set()) | self.used
        harmless = _HARMLESS_AT.get(self.arch, {})
        for key in sorted(set(self.cfg) - allowed):
            if key not in harmless:
                raise self.fail(key, f"unknown to the {self.arch} converter and may change the model's numbers; refusing to guess")
            value, expected = self.cfg[key], harmless[key]
            if type(value) is not type(expected) or value != expected:
                raise self.fail(key, f"is {value!r}; the {self.arch} converter supports only {expected!r}, "
                                     "the value that leaves the model's numbers unchanged")


def _activation(k: _Keys, key: str) -> str:
    name = k.get(key)
    if name not in _ACTIVATIONS:
        raise k.fail(key, f"activation {name!r} is not one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _reject_sliding_window(k: _Keys, num_layers: int) -> None:
    window = k.get("sliding_window")  # transformers already nulls it when use_sliding_window is false
    k.used.update({"use_sliding_window", "max_window_layers", "layer_types"})
    layer_types = k.values.get("layer_types")
    if layer_types is not None:
        if len(layer_types) != num_layers or set(layer_types) - {"full_attention", "sliding_attention"}:
            raise k.fail("layer_types", f"{layer_types} must list full_attention/sliding_attention for {num_layers} layers")
        if k.arch != MISTRAL and "sliding_attention" not in layer_types:
            window = None  # Qwen: only layers typed sliding_attention use the window
    if window is not None:
        raise k.fail("sliding_window", f"sliding-window attention (window {window}) is active and not supported")


def to_megatron_fields(hf_config: dict[str, Any], architecture: str | None = None, *, source: str | None = None) -> dict[str, Any]:
    """Megatron GPT config fields equivalent to ``hf_config``; raises on anything not reproducible."""
    arch = architecture or architecture_of(hf_config, source)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedConfigError("architectures", f"{arch!r} is not one of {SUPPORTED_ARCHITECTURES}", source=source)
    k = _Keys(hf_config, arch, source)
    fields = _gpt2_to_megatron(k) if arch == GPT2 else _llama_like_to_megatron(k)
    k.reject_leftovers()
    return fields


def _llama_like_to_megatron(k: _Keys) -> dict[str, Any]:
    hidden, heads, layers = k.get("hidden_size"), k.get("num_attention_heads"), k.get("num_hidden_layers")
    head_dim = k.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise k.fail("head_dim", f"missing and hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        head_dim = hidden // heads
    if k.arch == LLAMA:
        attn_bias, mlp_bias = bool(k.get("attention_bias")), bool(k.get("mlp_bias"))
        if attn_bias != mlp_bias:
            raise k.fail("mlp_bias", f"is {mlp_bias} while attention_bias is {attn_bias}; megatron's add_bias_linear sets both")
        bias_linear = qkv_bias = attn_bias
    elif k.arch == QWEN3 and k.get("attention_bias"):
        raise k.fail("attention_bias", "Qwen3 puts it on o_proj without MLP biases, which megatron cannot express")
    else:
        bias_linear, qkv_bias = False, k.arch == QWEN2
    _reject_sliding_window(k, layers)
    max_pos = k.get("max_position_embeddings")
    fields = {
        "num_layers": layers, "hidden_size": hidden, "ffn_hidden_size": k.get("intermediate_size"),
        "num_attention_heads": heads, "num_query_groups": k.get("num_key_value_heads") or heads, "kv_channels": head_dim,
        "layernorm_epsilon": float(k.get("rms_norm_eps")), "normalization": "RMSNorm",
        "activation": _activation(k, "hidden_act"), "gated_linear_unit": True,
        "add_bias_linear": bias_linear, "add_qkv_bias": qkv_bias, "qk_layernorm": k.arch == QWEN3,
        "vocab_size": k.get("vocab_size"), "seq_length": max_pos,
        "share_embeddings_and_output_weights": bool(k.get("tie_word_embeddings")),
    }
    fields.update(rope_fields_from_hf(k.raw, k.fail, max_pos, k.arch))
    return fields


def _gpt2_to_megatron(k: _Keys) -> dict[str, Any]:
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
        "activation": _activation(k, "activation_function"), "gated_linear_unit": False,
        "add_bias_linear": True, "add_qkv_bias": True, "qk_layernorm": False,
        "vocab_size": k.get("vocab_size"), "seq_length": k.get("n_positions"),
        "position_embedding_type": "learned_absolute",
        "share_embeddings_and_output_weights": bool(k.get("tie_word_embeddings")),
    }


def from_megatron_fields(fields: dict[str, Any], architecture: str,
                         passthrough: dict[str, Any] | None = None) -> dict[str, Any]:
    """An HF config dict (loadable with ``AutoConfig``) for megatron ``fields``.

    Missing fields take megatron-core defaults; fields with no HF meaning (parallel
    sizes, dropout, ...) are ignored, except those in ``_MEGATRON_MUST_BE_DEFAULT``.
    ``passthrough`` (typically the original HF config) contributes only its
    :data:`NON_NUMERIC_KEYS` such as token ids, which megatron fields do not carry.
    """
    _check_expressible(fields, architecture)
    cfg = _gpt2_config(fields) if architecture == GPT2 else _llama_like_config(fields, architecture)
    out = cfg.to_dict()
    for key, value in (passthrough or {}).items():
        if key in NON_NUMERIC_KEYS and key not in ("architectures", "model_type", "transformers_version"):
            out[key] = value
    out["architectures"] = [architecture]
    return out


def _check_expressible(fields: dict[str, Any], architecture: str) -> None:
    """A supported architecture, megatron-only switches at their defaults, the sizes present."""
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedConfigError("architecture", f"{architecture!r} is not one of {SUPPORTED_ARCHITECTURES}")
    for key, default in _MEGATRON_MUST_BE_DEFAULT.items():
        if fields.get(key, default) not in (default,):
            raise UnsupportedConfigError(key, f"is {fields[key]!r}; {architecture} cannot express anything but {default!r}")
    for key in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_length"):
        if fields.get(key) is None:
            raise UnsupportedConfigError(key, "required to build an HF config but missing")


def _shared_sizes(f: dict[str, Any]) -> tuple[int, int, int, int, bool, float]:
    """(hidden, heads, head_dim, ffn, tied embeddings, norm eps) with megatron's defaults."""
    hidden, heads = f["hidden_size"], f["num_attention_heads"]
    head_dim = f.get("kv_channels") or hidden // heads
    ffn = f.get("ffn_hidden_size") or 4 * hidden
    return hidden, heads, head_dim, ffn, bool(f.get("share_embeddings_and_output_weights", True)), f.get("layernorm_epsilon", 1e-5)


def _gpt2_config(f: dict[str, Any]) -> Any:
    import transformers

    arch = GPT2
    hidden, heads, _, ffn, share, eps = _shared_sizes(f)
    act = _need(f, "activation", tuple(_HF_ACT[GPT2]), arch, GELU)
    _need(f, "normalization", ("LayerNorm",), arch, "LayerNorm")
    _need(f, "gated_linear_unit", (False,), arch, False)
    _need(f, "position_embedding_type", ("learned_absolute",), arch, "learned_absolute")
    _need(f, "add_bias_linear", (True,), arch, True)
    _need(f, "qk_layernorm", (False,), arch, False)
    _need(f, "num_query_groups", (None, heads), arch)
    _need(f, "kv_channels", (None, hidden // heads), arch)
    return transformers.GPT2Config(
        vocab_size=f["vocab_size"], n_positions=f["seq_length"], n_embd=hidden, n_layer=f["num_layers"],
        n_head=heads, n_inner=None if ffn == 4 * hidden else ffn, activation_function=_HF_ACT[GPT2][act],
        layer_norm_epsilon=eps, tie_word_embeddings=share)


def _llama_like_config(f: dict[str, Any], arch: str) -> Any:
    """Llama, Mistral, Qwen2 and Qwen3: gated MLP, RMSNorm, RoPE; they differ in biases and head_dim."""
    import transformers

    hidden, heads, head_dim, ffn, share, eps = _shared_sizes(f)
    act = _need(f, "activation", tuple(_HF_ACT[LLAMA]), arch, GELU)
    _need(f, "normalization", ("RMSNorm",), arch, "LayerNorm")
    _need(f, "gated_linear_unit", (True,), arch, False)
    _need(f, "position_embedding_type", ("rope", "yarn"), arch, "learned_absolute")
    _need(f, "qk_layernorm", (arch == QWEN3,), arch, False)
    bias_linear = f.get("add_bias_linear", True)
    if arch == LLAMA:  # megatron's qkv has a bias if either flag is set; Llama needs all or none
        if not bias_linear:
            _need(f, "add_qkv_bias", (False,), arch, False)
    else:
        _need(f, "add_bias_linear", (False,), arch, True)
        _need(f, "add_qkv_bias", (arch == QWEN2,), arch, False)
    kwargs: dict[str, Any] = dict(
        vocab_size=f["vocab_size"], hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=f["num_layers"],
        num_attention_heads=heads, num_key_value_heads=f.get("num_query_groups") or heads,
        hidden_act=_HF_ACT[LLAMA][act], max_position_embeddings=f["seq_length"], rms_norm_eps=eps,
        tie_word_embeddings=share, rope_parameters=rope_parameters_to_hf(f, arch))
    if arch == LLAMA:
        kwargs.update(head_dim=head_dim, attention_bias=bool(bias_linear), mlp_bias=bool(bias_linear))
    elif arch == MISTRAL:
        kwargs.update(head_dim=head_dim, sliding_window=None)
    else:
        kwargs.update(use_sliding_window=False, sliding_window=None)
        if arch == QWEN3:
            kwargs.update(head_dim=head_dim, attention_bias=False)
        elif head_dim != hidden // heads:
            kwargs.update(head_dim=head_dim)
    return getattr(transformers, _CONFIG_CLASSES[arch])(**kwargs)
