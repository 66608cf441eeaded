"""Which GPT layer specs implement which architecture-variant fields.

A variant a spec does not build would be ignored silently (a wrong model that
still trains), so every spec factory refuses the ones it lacks
(:func:`require`), ``validate`` refuses them for a named ``layer_spec``, and
``auto`` skips the specs that lack them (:meth:`GPTModelBuilder.select_spec`).

* ``torch`` implements every field (SDPA core attention with windows and
  soft-capping, :class:`plugtron.runtime.cpu.TorchNorm`, the variant layer of
  :mod:`plugtron_gpt.layers`).
* ``te`` and ``te_full`` take what megatron-core 0.16.1 hands to
  transformer-engine itself: ``window_size`` / ``window_attn_skip_freq``
  (``TEDotProductAttention``) and ``layernorm_zero_centered_gamma`` (TE norms
  and fused norm-linears). Unverified here: no GPU in this project's CI.
* ``local`` and ``modelopt`` take none of them (megatron's own attention drops
  the window in its fused softmax and ignores ``attention_mask`` with one; its
  torch norm refuses zero-centred gamma).
* Model-level fields (``final_logit_softcap``, ``logits_divisor``,
  ``embedding_multiplier``) work with every spec: they act on the embedding
  and output layer, which no spec replaces.
"""

from __future__ import annotations

from typing import Any, Callable

TE = ("torch", "te", "te_full")
TORCH = ("torch",)

#: field -> (is it in use?, specs that implement it, what it is)
FEATURES: dict[str, tuple[Callable[[Any], bool], tuple[str, ...], str]] = {
    "window_size": (lambda c: c._get("window_size") is not None, TE, "sliding-window attention"),
    "attention_softcap": (lambda c: c.attention_softcap is not None, TORCH, "attention logit soft-capping"),
    "layernorm_zero_centered_gamma": (lambda c: bool(c._get("layernorm_zero_centered_gamma")), TE, "norms scaling by 1 + weight"),
    "norm_placement": (lambda c: c.norm_placement != "pre", TORCH, "post-attention/post-MLP norms"),
    "residual_multiplier": (lambda c: c.residual_multiplier is not None, TORCH, "scaled residual branches"),
    "qk_norm_scope": (lambda c: c.qk_norm_scope != "head", TORCH, "full-width q/k norms"),
    "rotary_base_local": (lambda c: c.rotary_base_local is not None, TORCH, "a RoPE base for sliding-window layers"),
}


def unsupported(config: Any, spec: str) -> list[tuple[str, str]]:
    """(field, what it is) of every variant in use that layer spec ``spec`` does not implement."""
    return [(name, what) for name, (used, specs, what) in FEATURES.items() if used(config) and spec not in specs]


def describe(missing: list[tuple[str, str]]) -> str:
    """``window_size (sliding-window attention), ...``: every field a spec lacks, on one line."""
    return ", ".join(f"{field} ({what})" for field, what in missing)


def require(config: Any, spec: str) -> None:
    """Raise :class:`~plugtron.errors.LayerSpecError` naming every variant in use that ``spec`` lacks."""
    missing = unsupported(config, spec)
    if missing:
        from plugtron.errors import LayerSpecError

        raise LayerSpecError(f"layer spec '{spec}' does not implement {describe(missing)}; use layer_spec 'torch'")
