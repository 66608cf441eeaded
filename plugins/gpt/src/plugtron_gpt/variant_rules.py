"""Rules for the architecture-variant fields of :class:`~plugtron_gpt.config.GPTModelConfig`.

The fields, what they compute, and the Hugging Face setting each mirrors:

* ``window_size`` / ``window_attn_skip_freq`` (megatron's own fields):
  sliding-window attention. ``window_size = (left, 0)``: query i sees keys
  ``i - left <= j <= i``; HF ``sliding_window = W`` (keys ``i - W < j <= i``)
  is ``(W - 1, 0)``. ``window_attn_skip_freq`` picks the windowed layers as
  megatron reads it (layer numbers 1-based): ``None`` every layer, an int
  N every layer whose number is not a multiple of N (Gemma-2: 2, Gemma-3: 6),
  a list of ``num_layers`` 0/1 entries with 1 = windowed (any HF
  ``layer_types``: 1 for ``sliding_attention``).
* ``attention_softcap``: ``scores = cap * tanh(scores / cap)`` after the
  softmax scale and before the mask (Gemma-2 ``attn_logit_softcapping``).
* ``final_logit_softcap``: ``logits = cap * tanh(logits / cap)`` (Gemma-2/3
  ``final_logit_softcapping``); ``logits_divisor``: ``logits / divisor``
  (Granite ``logits_scaling``); both on every output-layer call, MTP heads
  included, divisor first.
* ``embedding_multiplier``: the embedding output times it (Granite
  ``embedding_multiplier``: a Python-float multiply); with
  ``embedding_multiplier_cast`` the multiplier is first rounded to float32
  and then to the activation dtype (Gemma's ``sqrt(hidden_size)`` buffer).
* ``norm_placement``: ``pre`` (megatron's layer), ``sandwich`` (pre-norms plus
  ``post_attention_layernorm`` on the attention output and
  ``post_mlp_layernorm`` on the MLP output, each before its residual add:
  Gemma-2/3, Glm4), ``post`` (only those two: Olmo2).
* ``residual_multiplier``: ``hidden = residual + branch * m`` for attention and
  MLP (Granite). ``softmax_scale`` (megatron's) is Granite's
  ``attention_multiplier`` and Gemma's ``query_pre_attn_scalar ** -0.5``.
* ``layernorm_zero_centered_gamma`` (megatron's): every norm scales by
  ``1 + weight`` (Gemma RMSNorm, Nemotron LayerNorm1P), q/k and final norms too.
* ``qk_norm_scope``: ``head`` (megatron's per-head q/k norms) or ``full``: one
  RMSNorm over all heads of q and one over all kv heads of k, before RoPE
  (Olmo2); needs ``qk_layernorm``.
* ``rotary_base_local``: RoPE base of the windowed layers (Gemma-3
  ``rope_local_base_freq``), without ``rope_scaling`` or
  ``seq_len_interpolation_factor``, which stay with the full-attention layers.

Each rule raises :class:`~plugtron.errors.ConfigError` naming the field.
"""

from __future__ import annotations

import math
from typing import Any

NORM_PLACEMENTS = ("pre", "sandwich", "post")
QK_NORM_SCOPES = ("head", "full")
_POSITIVE = ("attention_softcap", "final_logit_softcap", "logits_divisor", "rotary_base_local")


def variant_kwargs(config: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """What megatron's live config receives for the variants: window as a tuple, qk_layernorm off for full scope."""
    out: dict[str, Any] = {}
    if kwargs.get("window_size") is not None:
        out["window_size"] = tuple(kwargs["window_size"])
    if config.qk_norm_scope == "full":
        out["qk_layernorm"] = False
    return out


def check_variants(config: Any) -> None:
    _check_scalars(config)
    _check_window(config)
    _check_norms(config)
    _check_rotary(config)
    _check_mtp(config)
    if config.layer_spec != "auto":
        from plugtron_gpt.features import describe, unsupported

        missing = unsupported(config, config.layer_spec)
        if missing:
            config._fail(missing[-1][0], f"layer spec '{config.layer_spec}' does not implement {describe(missing)}; use layer_spec 'torch'")


def _check_scalars(config: Any) -> None:
    for name in _POSITIVE:
        value = getattr(config, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            config._fail(name, f"must be a positive number or null, not {value!r}")
    for name in ("embedding_multiplier", "residual_multiplier"):
        value = getattr(config, name)
        if value is not None and not math.isfinite(value):
            config._fail(name, f"must be a finite number or null, not {value!r}")
    if config.embedding_multiplier_cast and config.embedding_multiplier is None:
        config._fail("embedding_multiplier_cast", "is set but embedding_multiplier is not")
    if config.embedding_multiplier is not None and config.position_embedding_type == "learned_absolute":
        config._fail("embedding_multiplier", "is not defined with learned_absolute position embeddings (which sum would it scale?)")


def _check_window(config: Any) -> None:
    window = config._get("window_size")
    skip = config._get("window_attn_skip_freq")
    if window is None:
        if skip is not None:
            config._fail("window_attn_skip_freq", "is set but window_size is not")
        return
    if not (isinstance(window, (list, tuple)) and len(window) == 2 and all(isinstance(w, int) and not isinstance(w, bool) for w in window)):
        config._fail("window_size", f"must be two integers (left, right), not {window!r}")
    if window[0] < 0 or window[1] != 0:
        config._fail("window_size", f"must be (left >= 0, 0) for causal sliding-window attention (HF sliding_window W is (W - 1, 0)), not {tuple(window)!r}")
    if isinstance(skip, bool) or (isinstance(skip, int) and skip < 1):
        config._fail("window_attn_skip_freq", f"must be a positive integer or a list of 0/1 per layer, not {skip!r}")
    if isinstance(skip, (list, tuple)):
        layers = config._get("num_layers")
        if len(skip) != layers or any(v not in (0, 1) for v in skip):
            config._fail("window_attn_skip_freq", f"as a list needs one 0/1 entry per layer ({layers}), 1 = sliding window; got {list(skip)!r}")
    if config.is_mla():
        config._fail("window_size", "is not implemented for multi_latent_attention")


def _check_norms(config: Any) -> None:
    if config.norm_placement not in NORM_PLACEMENTS:
        config._fail("norm_placement", f"must be one of {', '.join(NORM_PLACEMENTS)}, not {config.norm_placement!r}")
    if config.qk_norm_scope not in QK_NORM_SCOPES:
        config._fail("qk_norm_scope", f"must be one of {', '.join(QK_NORM_SCOPES)}, not {config.qk_norm_scope!r}")
    if config.qk_norm_scope == "full":
        if not config.qk_layernorm:
            config._fail("qk_norm_scope", "'full' needs qk_layernorm: true")
        if config.is_mla():
            config._fail("qk_norm_scope", "'full' is not defined for multi_latent_attention")
        if config._get("normalization", "LayerNorm") != "RMSNorm":
            config._fail("qk_norm_scope", "'full' is implemented for normalization RMSNorm only (Olmo2)")
        if config._get("qk_l2_norm"):
            config._fail("qk_norm_scope", "'full' cannot be combined with qk_l2_norm")


def _check_rotary(config: Any) -> None:
    if config.rotary_base_local is None:
        return
    if config.position_embedding_type != "rope" or config.is_mla():
        config._fail("rotary_base_local", f"needs position_embedding_type 'rope' without MLA, not {config.position_embedding_type!r}")
    if config._get("window_size") is None:
        config._fail("rotary_base_local", "applies to the sliding-window layers, but window_size is not set")
    if (config._get("context_parallel_size", 1) or 1) > 1:
        config._fail("rotary_base_local", "is not implemented with context parallelism")


def _check_mtp(config: Any) -> None:
    if not config._get("mtp_num_layers"):
        return
    if isinstance(config._get("window_attn_skip_freq"), (list, tuple)):
        config._fail("window_attn_skip_freq", "as a per-layer list does not cover the MTP layers (megatron indexes it by layer number)")
    if config._get("no_rope_freq"):
        config._fail("no_rope_freq", "does not cover the MTP layers (megatron expands it to one entry per decoder layer and indexes it by layer number)")
