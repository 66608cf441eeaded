"""``Gemma3ForCausalLM`` (text only, ``model_type: gemma3_text``, ``Gemma3TextConfig``): Gemma 2 plus q/k norms
and two RoPE bases.

What Gemma 3 changes from Gemma 2:

* per-head ``q_norm`` / ``k_norm`` ((1 + w) RMSNorm over ``head_dim``, before
  RoPE): megatron's ``qk_layernorm``, zero-centred like every other norm;
* RoPE per layer type: sliding layers use ``rope_local_base_freq`` (10 000)
  without scaling, global layers ``rope_theta`` (1 000 000) with an optional
  scaling (``linear`` for the larger checkpoints): ``rotary_base_local`` for
  the windowed layers, the usual rotary fields for the others. transformers 5
  writes this as ``rope_parameters = {"sliding_attention": {...},
  "full_attention": {...}}``; older files as ``rope_theta`` /
  ``rope_local_base_freq`` / ``rope_scaling`` (applied to global layers only);
* every 6th layer global by default (``sliding_window_pattern``), final
  logit soft-capping off by default, and no attention soft-capping: transformers
  5.23's Gemma 3 attention never applies ``attn_logit_softcapping``, so a file
  that sets it is refused rather than read one way or the other.
"""

from __future__ import annotations

from typing import Any

from plugtron.conversion import ConfigReader, ConfigSchema

from .adapter import GPTAdapter
from .architecture import Fields
from .gemma2 import GEMMA2, GEMMA2_EXPRESSES, GEMMA2_NON_NUMERIC, GEMMA2_TYPES, derive_gemma2, read_gemma2, write_gemma2
from .llama import FULL, SLIDING
from .rope import DEFAULT_ROPE_THETA, need_value, rope_fields_from_hf, rope_parameters_to_hf

#: Gemma3TextConfig.default_theta: global and local RoPE bases when a file names neither.
GLOBAL_THETA, LOCAL_THETA = 1_000_000.0, 10_000.0


def _rope_blocks(k: ConfigReader) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (full, sliding) RoPE parameter dicts, as Gemma3TextConfig assembles them from either spelling."""
    params = k.raw("rope_parameters")
    if params is None:
        params = {}
    if not isinstance(params, dict) or set(params) - {FULL, SLIDING} or \
            not all(v is None or isinstance(v, dict) for v in params.values()):
        raise k.fail("rope_parameters", f"{params!r:.200} must map full_attention / sliding_attention to "
                     "RoPE parameter dicts")
    full = dict(params.get(FULL) or {"rope_type": "default"})
    sliding = dict(params.get(SLIDING) or {"rope_type": "default"})
    scaling = k.raw("rope_scaling")
    if scaling is not None:
        if not isinstance(scaling, dict):
            raise k.fail("rope_scaling", f"{scaling!r:.200} must be a dict")
        full.update(scaling)
    theta, local = k.raw("rope_theta"), k.raw("rope_local_base_freq")
    full.setdefault("rope_theta", GLOBAL_THETA if theta is None else theta)
    sliding.setdefault("rope_theta", LOCAL_THETA if local is None else local)
    return full, sliding


def read_rope(k: ConfigReader, max_pos: int, has_window: bool) -> Fields:
    full, sliding = _rope_blocks(k)

    def fail(key: str, problem: str) -> Exception:
        return k.fail(key.replace("rope_parameters", f"rope_parameters.{FULL}"), problem)

    fields = rope_fields_from_hf({"rope_parameters": full}.get, fail, max_pos, k.architecture)
    if has_window and fields["position_embedding_type"] != "rope":
        raise k.fail(f"rope_parameters.{FULL}.rope_type", f"is {full.get('rope_type')!r}; megatron's local RoPE base "
                     "is implemented with plain rope (default, linear, llama3) on the global layers")
    rope_type = sliding.pop("rope_type", None) or sliding.pop("type", None) or "default"
    theta = sliding.pop("rope_theta")
    if rope_type != "default" or sliding:
        raise k.fail(f"rope_parameters.{SLIDING}", f"{ {'rope_type': rope_type, **sliding} } is not supported: "
                     "megatron's sliding-window layers take only a RoPE base (rotary_base_local)")
    fields["rotary_base_local"] = float(theta) if has_window else None
    return fields


class _RopeRead:
    """``k`` with the RoPE keys hidden: :func:`~.llama.read_decoder` reads RoPE as one flat block,
    which Gemma 3's per-layer-type parameters are not; :func:`read_rope` has read them already."""

    KEYS = ("rope_parameters", "rope_scaling", "rope_theta")

    def __init__(self, k: ConfigReader) -> None:
        self._k = k

    def __getattr__(self, name: str) -> Any:
        return getattr(self._k, name)

    def raw(self, key: str) -> Any:
        return None if key in self.KEYS else self._k.raw(key)


def _read(k: ConfigReader) -> Fields:
    softcap = k.get("attn_logit_softcapping")
    if softcap is not None:
        raise k.fail("attn_logit_softcapping", f"is {softcap}; transformers' Gemma 3 never applies it, so the "
                     "checkpoint's intended attention is ambiguous")
    # the pattern only derives layer_types (read below, as is the local base)
    k.mark("sliding_window_pattern", "_sliding_window_pattern", "rope_local_base_freq")
    fields = read_gemma2(_RopeRead(k), qk_layernorm=True, attention_cap=False)  # type: ignore[arg-type]
    for key in ("rotary_base", "rope_scaling", "seq_len_interpolation_factor", "rope_scaling_factor"):
        fields.pop(key, None)
    fields.update(read_rope(k, fields["seq_length"], fields.get("window_size") is not None))
    return fields


def _write(f: Fields) -> dict[str, Any]:
    arch = GEMMA3.name
    need_value(f, "attention_softcap", (None,), arch)
    need_value(f, "qk_norm_scope", ("head",), arch, "head")
    need_value(f, "position_embedding_type", ("rope",), arch)
    out = write_gemma2(f, arch, qk_layernorm=True)
    out.pop("attn_logit_softcapping")
    local = f.get("rotary_base_local")
    if local is None:
        local = f.get("rotary_base", DEFAULT_ROPE_THETA)
    out["rope_parameters"] = {FULL: rope_parameters_to_hf(f, arch),
                              SLIDING: {"rope_type": "default", "rope_theta": local}}
    return out


def _derive(values: dict[str, Any]) -> None:
    derive_gemma2(values, pattern=values.get("sliding_window_pattern", 6))


GEMMA3 = GEMMA2.derive(
    name="Gemma3ForCausalLM", model_type="gemma3_text", config_class="Gemma3TextConfig", read=_read, write=_write,
    expresses=GEMMA2_EXPRESSES | {"rotary_base_local"},
    schema=ConfigSchema(
        defaults={**GEMMA2.schema.defaults, "vocab_size": 262208, "max_position_embeddings": 131072,
                  "final_logit_softcapping": None, "attn_logit_softcapping": None,
                  "use_bidirectional_attention": False},
        types=GEMMA2_TYPES, derive=_derive, non_numeric=GEMMA2_NON_NUMERIC))

ADAPTER = GPTAdapter(GEMMA3)
