"""HF ``config.json`` <-> :class:`~plugtron_mamba.config.MambaModelConfig` for Mamba2 and NemotronH.

Strict on purpose, like the bridge's GPT translation: a key that changes the
forward numbers and is silently dropped gives a converted model that loads,
runs and is subtly wrong. Every key of the HF file must therefore be

* translated (sizes, the layer pattern, norms, tied embeddings ...),
* required to have the one value megatron's Mamba stack can reproduce
  (``use_bias`` false, SiLU mixer, ``layer_norm_epsilon`` 1e-5 ...), or
* known not to change the forward pass: :data:`plugtron.conversion.NON_NUMERIC_KEYS`
  plus :data:`IGNORED` (each entry says why),

and anything else raises ``UnsupportedConfigError`` naming the key. Values are
read through the transformers config class, so absent keys take the defaults
(and NemotronH's legacy spellings such as ``hybrid_override_pattern``) exactly
as the transformers model would.

Facts of transformers 5 this relies on (checked against its modeling code):

* both models use ``layer_norm_epsilon`` for the block norms, the final norm
  *and* the mixer's gated RMSNorm; megatron's MambaMixer (and TorchMambaMixer)
  fix the latter at 1e-5, so any other value is refused;
* NemotronH layers are ``linear_attention`` (Mamba-2, ``M``), ``full_attention``
  (``*``: GQA without RoPE, no biases, scale ``head_dim**-0.5``), ``mlp`` (``-``:
  ``down(relu(up(x))**2)``, not gated) and ``moe`` (``E``, see :mod:`.moe`); every
  layer is pre-norm (RMSNorm) plus residual, as megatron's hybrid layers;
* NemotronH's mixer width is ``mamba_num_heads * mamba_head_dim`` (``expand`` is
  not read), and its ``lm_head`` is never tied to the embeddings, whatever
  ``tie_word_embeddings`` says (its tied-weights table is empty).

Known deviation (accepted, not refused, because refusing would reject every
NemotronH checkpoint): transformers' NemotronH clamps the step size
``softplus(dt + dt_bias)`` from below at ``time_step_min``; megatron's mixer,
which trained these models, does not clamp. Outputs agree exactly wherever no
step falls below ``time_step_min`` (0.001 by default).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable

from .moe import MOE_IGNORED, moe_fields_from_hf, moe_fields_to_hf

MAMBA2 = "Mamba2ForCausalLM"
NEMOTRON_H = "NemotronHForCausalLM"
ARCHITECTURES = (MAMBA2, NEMOTRON_H)
_CONFIG_CLASSES = {MAMBA2: "Mamba2Config", NEMOTRON_H: "NemotronHConfig"}
_MODEL_TYPES = {MAMBA2: "mamba2", NEMOTRON_H: "nemotron_h"}
SQUARED_RELU = "megatron.core.activations:squared_relu"
#: eps of the mixer's gated RMSNorm, fixed in megatron's MambaMixer and in TorchMambaMixer.
MIXER_NORM_EPS = 1e-5
#: Every converted model: CPU-safe construction, no dropout (HF checkpoints are compared in inference numerics).
CONVERSION_DEFAULTS: dict[str, Any] = {"use_cpu_initialization": True, "hidden_dropout": 0.0, "attention_dropout": 0.0}

_INIT = "initialisation only"
_NOT_READ = "not read by the transformers model"
IGNORED: dict[str, dict[str, str]] = {
    MAMBA2: {
        "initializer_range": _INIT, "rescale_prenorm_residual": _INIT, "time_step_min": _INIT,
        "time_step_max": _INIT, "time_step_floor": _INIT, "time_step_rank": _NOT_READ,
        "use_cache": "generation cache only", "auto_map": "names remote code; the bridge uses transformers' own class",
        "residual_in_fp32": "no effect in float32; in bfloat16/float16 transformers adds residuals in float32, "
                            "megatron in the parameter dtype (a rounding difference, not a different function)",
    },
    NEMOTRON_H: {
        "initializer_range": _INIT, "rescale_prenorm_residual": _INIT, "time_step_max": _INIT, "time_step_floor": _INIT,
        "time_step_min": "dt_bias initialisation, and a lower clamp of the step size (see the module docstring)",
        "time_step_limit": "not read: transformers' NemotronH always clamps to (time_step_min, inf)",
        "time_step_rank": _NOT_READ, "rms_norm_eps": _NOT_READ, "residual_in_fp32": _NOT_READ,
        "mamba_proj_bias": _NOT_READ, "hidden_dropout": _NOT_READ, "attention_dropout": "training only",
        "attention_bias": "not read: NemotronH's attention projections never have biases",
        "tie_word_embeddings": "not read: NemotronH's lm_head is never tied to the embeddings",
        "use_mamba_kernels": "kernel choice only", "mamba_ssm_cache_dtype": "generation cache only",
        "num_logits_to_keep": "generation only", "use_cache": "generation cache only",
        "auto_map": "names remote code; the bridge uses transformers' own class",
        "num_hidden_layers": "derived from the layer types by transformers",
        # published Nemotron-3 Nano / NemotronH configs carry these; transformers' NemotronH reads none of them
        "norm_eps": "not read: every NemotronH norm uses layer_norm_epsilon",
        "rope_theta": "not read: NemotronH's attention has no rotary embedding",
        "partial_rotary_factor": "not read: NemotronH's attention has no rotary embedding",
    },
}
IGNORED[NEMOTRON_H].update(MOE_IGNORED)  # MoE keys transformers' forward never reads (kept on export)
#: NemotronH keys read only by multi-token-prediction layers (refused when present).
_MTP_KEYS = ("mtp_layers_block_type", "mtp_hybrid_override_pattern")
#: NemotronH's legacy spellings (transformers renames them on load): canonical key -> legacy keys.
_LEGACY = {"n_groups": ("mamba_n_groups",), "conv_kernel": ("mamba_d_conv",), "expand": ("mamba_expand",),
           "chunk_size": ("mamba_chunk_size",), "use_conv_bias": ("mamba_conv_bias",),
           "layers_block_type": ("hybrid_override_pattern", "layer_types"),
           "time_step_min": ("mamba_dt_min",), "time_step_max": ("mamba_dt_max",),
           "time_step_limit": ("mamba_dt_limit",), "time_step_floor": ("mamba_dt_init_floor",)}
_SYMBOLS = {"linear_attention": "M", "full_attention": "*", "mlp": "-", "moe": "E"}
_LAYER_TYPES = {symbol: name for name, symbol in _SYMBOLS.items()}


_FLOAT_TAGS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def decode_floats(value: Any) -> Any:
    """transformers writes non-finite floats as ``{"__float__": "Infinity"}`` (JSON has no inf);
    turn them back into floats, as its own loader does (``time_step_limit`` is ``[0.0, inf]``)."""
    if isinstance(value, dict):
        if set(value) == {"__float__"} and value["__float__"] in _FLOAT_TAGS:
            return _FLOAT_TAGS[value["__float__"]]
        return {k: decode_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(decode_floats(v) for v in value)
    return value


def _errors() -> Any:
    from plugtron.conversion import errors

    return errors


class _Reader:
    """Reads keys through the transformers config object and records which were consumed."""

    def __init__(self, cfg: dict[str, Any], arch: str, source: str | None) -> None:
        import transformers

        self.cfg, self.arch, self.source, self.used = cfg, arch, source, set()
        model_type = cfg.get("model_type")
        if model_type is not None and model_type != _MODEL_TYPES[arch]:
            raise self.fail("model_type", f"{model_type!r} does not match architecture {arch}")
        try:
            self.hf = getattr(transformers, _CONFIG_CLASSES[arch]).from_dict(decode_floats(copy.deepcopy(cfg)))
        except Exception as exc:  # transformers validates some values itself
            raise self.fail("config", f"transformers rejects it as a {arch} config: {exc}") from exc

    def get(self, key: str) -> Any:
        self.used.add(key)
        if self.arch == NEMOTRON_H:
            self.used.update(_LEGACY.get(key, ()))
        return getattr(self.hf, key, self.cfg.get(key))

    def need(self, key: str, ok: Callable[[Any], bool], why: str) -> Any:
        value = self.get(key)
        if not ok(value):
            raise self.fail(key, f"is {value!r}; {why}")
        return value

    def fail(self, key: str, problem: str) -> Exception:
        return _errors().UnsupportedConfigError(key, problem, source=self.source)

    def reject_leftovers(self) -> None:
        from plugtron.conversion import NON_NUMERIC_KEYS

        allowed = NON_NUMERIC_KEYS | set(IGNORED[self.arch]) | self.used
        for key in sorted(set(self.cfg) - allowed):
            raise self.fail(key, f"unknown to the {self.arch} converter and may change the model's numbers; refusing to guess")


def _limit(value: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in value)


def _common_mixer_checks(r: _Reader, act_key: str) -> float:
    """Checks both models share; returns the norm epsilon."""
    r.need(act_key, lambda v: v == "silu", "megatron's Mamba-2 mixer uses SiLU for the conv and the gate")
    r.need("use_bias", lambda v: not v, "megatron's MambaMixer has no in_proj/out_proj biases")
    r.need("use_conv_bias", bool, "megatron's MambaMixer always has a conv1d bias")
    return float(r.need("layer_norm_epsilon", lambda v: float(v) == MIXER_NORM_EPS,
                        f"transformers also uses it in the mixer's gated RMSNorm, fixed at {MIXER_NORM_EPS} in megatron"))


def _mixer_fields(r: _Reader, *, heads: str, head_dim: str, state: str) -> dict[str, Any]:
    return {"mamba_num_heads": r.get(heads), "mamba_head_dim": r.get(head_dim), "mamba_state_dim": r.get(state),
            "mamba_num_groups": r.get("n_groups"), "mamba_expand": r.get("expand"),
            "mamba_conv_kernel": r.get("conv_kernel"), "mamba_chunk_size": r.get("chunk_size")}


def mamba2_fields(r: _Reader) -> dict[str, Any]:
    eps = _common_mixer_checks(r, "hidden_act")
    r.need("time_step_limit", lambda v: _limit(v) == (0.0, math.inf), "it clamps the step size; megatron's mixer does not")
    layers, heads = r.get("num_hidden_layers"), r.get("num_heads")
    return {
        "num_layers": layers, "hybrid_override_pattern": "M" * layers, "hidden_size": r.get("hidden_size"),
        # megatron requires attention heads even without attention layers; the Mamba head count
        # divides by TP exactly when the mixer does, so it never adds a constraint of its own.
        "num_attention_heads": heads, "vocab_size": r.get("vocab_size"),
        "share_embeddings_and_output_weights": bool(r.get("tie_word_embeddings")),
        "normalization": "RMSNorm", "layernorm_epsilon": eps, "position_embedding_type": "none", "add_bias_linear": False,
        **_mixer_fields(r, heads="num_heads", head_dim="head_dim", state="state_size"),
    }


def nemotron_h_fields(r: _Reader) -> dict[str, Any]:
    from plugtron.records import resolve

    eps = _common_mixer_checks(r, "mamba_hidden_act")
    types = r.get("layers_block_type")
    pattern = "".join(_SYMBOLS.get(t, "?") for t in types)
    if "?" in pattern:
        raise r.fail("layers_block_type", f"{types} has unknown layers; the mamba family builds linear_attention "
                                          "(Mamba), full_attention, mlp and moe layers")
    moe = moe_fields_from_hf(r, pattern)
    r.need("num_nextn_predict_layers", lambda v: not v, "multi-token-prediction layers are not built by the mamba family")
    r.used.update(_MTP_KEYS)
    r.need("mlp_hidden_act", lambda v: v == "relu2", "only relu2 (megatron's squared_relu) is mapped")
    r.need("mlp_bias", lambda v: not v, "megatron's add_bias_linear would give the attention projections "
                                       "biases too, which NemotronH never has")
    r.need("sliding_window", lambda v: v is None, "sliding-window attention is not supported")
    hidden, heads = r.get("hidden_size"), r.get("num_attention_heads")
    return {
        "num_layers": len(pattern), "hybrid_override_pattern": pattern, "hidden_size": hidden,
        "num_attention_heads": heads, "num_query_groups": r.get("num_key_value_heads") or heads,
        "kv_channels": r.get("head_dim") or hidden // heads, "ffn_hidden_size": r.get("intermediate_size"),
        "activation_func": resolve(SQUARED_RELU), "gated_linear_unit": False, "add_bias_linear": False,
        "normalization": "RMSNorm", "layernorm_epsilon": eps, "position_embedding_type": "none",
        "vocab_size": r.get("vocab_size"), "seq_length": r.get("max_position_embeddings"),
        "share_embeddings_and_output_weights": False,
        **_mixer_fields(r, heads="mamba_num_heads", head_dim="mamba_head_dim", state="ssm_state_size"), **moe,
    }


def config_from_hf(hf_config: dict[str, Any], arch: str, *, source: str | None = None) -> Any:
    """The MambaModelConfig reproducing ``hf_config``; raises UnsupportedConfigError naming a key otherwise."""
    from plugtron_mamba.config import MambaModelConfig

    if arch not in ARCHITECTURES:
        raise _errors().UnsupportedConfigError("architectures", f"{arch!r} is not one of {ARCHITECTURES}", source=source)
    r = _Reader(hf_config, arch, source)
    fields = mamba2_fields(r) if arch == MAMBA2 else nemotron_h_fields(r)
    r.reject_leftovers()
    return MambaModelConfig(**{**CONVERSION_DEFAULTS, **fields})


# -- MambaModelConfig -> HF ------------------------------------------------------------------------
def _require(config: Any, key: str, allowed: tuple[Any, ...], arch: str) -> None:
    value = getattr(config, key)
    if value not in allowed:
        shown = " or ".join(repr(a) for a in allowed)
        raise _errors().UnsupportedConfigError(key, f"is {value!r}; {arch} can only express {shown}")


def _check_common(config: Any, arch: str) -> None:
    _require(config, "normalization", ("RMSNorm",), arch)
    _require(config, "layernorm_zero_centered_gamma", (False,), arch)
    _require(config, "apply_residual_connection_post_layernorm", (False,), arch)
    _require(config, "position_embedding_type", ("none",), arch)
    _require(config, "layernorm_epsilon", (MIXER_NORM_EPS,), arch)  # also the mixer's gated-norm eps in HF


def _check_attention_mlp(config: Any, pattern: str) -> None:
    from plugtron.records import import_path_of

    arch = NEMOTRON_H
    for key, allowed in (("share_embeddings_and_output_weights", (False,)),
                         ("multi_latent_attention", (False,)), ("qk_layernorm", (False,))):
        _require(config, key, allowed, arch)
    if "-" in pattern or "E" in pattern:  # MLPs, routed and shared experts all use mlp_hidden_act
        _require(config, "gated_linear_unit", (False,), arch)
        if import_path_of(config.activation_func) != SQUARED_RELU:
            raise _errors().UnsupportedConfigError("activation_func", f"{arch} MLPs use relu2 ({SQUARED_RELU}) only")
    if "*" in pattern:
        for key, allowed in (("add_qkv_bias", (False,)), ("softmax_scale", (None,)), ("window_size", (None,)),
                             ("apply_query_key_layer_scaling", (False,))):
            _require(config, key, allowed, arch)
    if "*" in pattern or "-" in pattern or "E" in pattern:
        _require(config, "add_bias_linear", (False,), arch)


def config_to_hf(config: Any, arch: str, passthrough: dict[str, Any] | None = None) -> dict[str, Any]:
    """An HF config dict for ``config``; ``passthrough`` (the source file) keeps its non-numeric keys."""
    import transformers

    from plugtron.conversion import NON_NUMERIC_KEYS

    _check_common(config, arch)
    pattern, sizes = config.layer_pattern(), config.mamba_sizes()
    mixer = {"n_groups": sizes["groups"], "conv_kernel": config.mamba_conv_kernel, "chunk_size": config.mamba_chunk_size,
             "use_bias": False, "use_conv_bias": True, "layer_norm_epsilon": config.layernorm_epsilon,
             "vocab_size": config.vocab_size, "hidden_size": config.hidden_size}
    if arch == MAMBA2:
        if set(pattern) != {"M"}:
            raise _errors().UnsupportedConfigError("hybrid_override_pattern", f"{pattern!r}: {arch} has Mamba layers only")
        if sizes["inner"] % config.hidden_size:
            raise _errors().UnsupportedConfigError(
                "mamba_num_heads", f"mixer width {sizes['inner']} is not a multiple of hidden_size {config.hidden_size}")
        cfg = transformers.Mamba2Config(
            num_heads=sizes["heads"], head_dim=sizes["head_dim"], state_size=sizes["state"], num_hidden_layers=len(pattern),
            expand=sizes["inner"] // config.hidden_size, hidden_act="silu",
            tie_word_embeddings=bool(config.share_embeddings_and_output_weights), **mixer)
    else:
        _check_attention_mlp(config, pattern)
        heads = config.num_attention_heads
        cfg = transformers.NemotronHConfig(
            layers_block_type=[_LAYER_TYPES[s] for s in pattern], num_attention_heads=heads,
            num_key_value_heads=config.num_query_groups or heads,
            head_dim=config.kv_channels or config.hidden_size // heads, max_position_embeddings=config.seq_length,
            intermediate_size=config.ffn_hidden_size, mlp_hidden_act="relu2", mlp_bias=False, mamba_hidden_act="silu",
            mamba_num_heads=sizes["heads"], mamba_head_dim=sizes["head_dim"], ssm_state_size=sizes["state"],
            expand=config.mamba_expand, tie_word_embeddings=False, **moe_fields_to_hf(config, pattern), **mixer)
    out = cfg.to_dict()
    keep = (NON_NUMERIC_KEYS | set(IGNORED[arch])) - {"architectures", "model_type", "transformers_version"}
    out.update({key: value for key, value in decode_floats(passthrough or {}).items() if key in keep})
    out["architectures"] = [arch]
    return out
