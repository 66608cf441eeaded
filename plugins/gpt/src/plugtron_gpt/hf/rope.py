"""RoPE settings: HF ``rope_parameters`` <-> megatron rotary fields.

Kept apart from :mod:`hf_config` because this is where the two libraries'
formulas must agree exactly: megatron's llama-3 scaling hard-codes its
frequency constants, and HF and megatron derive the YaRN cos/sin scale from
``mscale``/``mscale_all_dim`` with different rules for zero/None, so each
accepted combination is one both compute identically (checked by the
megatron parity test).
"""

from __future__ import annotations

import math
from typing import Any, Callable

from plugtron.conversion import UnsupportedConfigError

#: megatron-core's llama-3 RoPE scaling hard-codes these values (only the factor is configurable).
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
DEFAULT_ROPE_THETA = 10000.0


def need_value(fields: dict[str, Any], key: str, allowed: tuple[Any, ...], arch: str, default: Any = None) -> Any:
    """``fields[key]`` (or ``default``) if it is one of ``allowed``, else an error naming ``key``."""
    value = fields.get(key, default)
    if value not in allowed:
        raise UnsupportedConfigError(key, f"is {value!r}; {arch} needs one of {list(allowed)}")
    return value


def _yarn_concentration(factor: float, mscale: float | None, mscale_all_dim: float | None) -> float:
    """The cos/sin scale megatron's YaRN applies (same formula HF uses when both mscales are truthy)."""

    def get(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if mscale is None or mscale_all_dim is None:
        return get(factor)
    return get(factor, mscale) / get(factor, mscale_all_dim)


def rope_fields_from_hf(raw: Callable[[str], Any], fail: Callable[[str, str], Exception], max_pos: int,
                        arch: str, *, partial_rotary: bool = False,
                        partial_rotary_default: float | None = None,
                        rope_theta_default: float = DEFAULT_ROPE_THETA) -> dict[str, Any]:
    """Megatron RoPE fields from an HF config.

    ``raw(key)`` returns the config value as written (None when absent) and marks
    the key as consumed; ``fail(key, problem)`` builds the error to raise.
    ``partial_rotary``: whether the architecture applies ``partial_rotary_factor``
    (megatron's ``rotary_percent``); where it does not, a factor below 1 is refused.
    ``partial_rotary_default``: the factor the config class assumes when the file
    names none (StableLM 0.25, Nemotron 0.5; ``None`` means 1).
    ``rope_theta_default``: the config class's ``default_theta`` (ERNIE 4.5 5e5, SmolLM3 2e6).
    Handles both ``rope_parameters`` (transformers 5) and the older
    ``rope_scaling`` + top-level ``rope_theta`` spelling.
    """
    merged: dict[str, Any] = {}
    src = "rope_parameters"
    for key in ("rope_scaling", "rope_parameters"):  # older files: rope_scaling + top-level rope_theta
        block = raw(key)
        if block is None:
            continue
        if not isinstance(block, dict) or any(isinstance(v, dict) for v in block.values()):
            raise fail(key, "must be one flat dict; per-layer-type RoPE parameters are not supported")
        merged.update(block)
        src = key
    rope_type = merged.pop("rope_type", None) or merged.pop("type", None) or "default"
    merged.pop("type", None)
    top_theta, top_partial = raw("rope_theta"), raw("partial_rotary_factor")
    theta = merged.pop("rope_theta", None) or top_theta or rope_theta_default
    partial = merged.pop("partial_rotary_factor", None) or top_partial or partial_rotary_default
    if partial not in (None, 1, 1.0) and not partial_rotary:
        raise fail("partial_rotary_factor", f"is {partial}; partial rotary embeddings are not supported for {arch}")
    missing = object()

    def take(key: str, default: Any = missing) -> Any:
        value = merged.pop(key, None)
        if value is None and default is missing:
            raise fail(f"{src}.{key}", f"required for rope_type {rope_type!r} but missing")
        return default if value is None else value

    out: dict[str, Any] = {"position_embedding_type": "rope", "rotary_base": theta, "rotary_percent": float(partial or 1.0),
                           "rope_scaling": False, "seq_len_interpolation_factor": None}
    if rope_type == "linear":
        out["seq_len_interpolation_factor"] = float(take("factor"))
    elif rope_type == "llama3":
        out.update(rope_scaling=True, rope_scaling_factor=float(take("factor")))
        for key, fixed in MEGATRON_LLAMA3_ROPE.items():
            value = take(key, max_pos if key == "original_max_position_embeddings" else missing)
            if float(value) != fixed:
                raise fail(f"{src}.{key}", f"is {value}, but megatron-core's llama-3 RoPE scaling hard-codes {fixed}")
    elif rope_type == "yarn":
        orig = int(take("original_max_position_embeddings", max_pos))
        factor = float(take("factor", max_pos / orig))
        mscale, mscale_all = take("mscale", None), take("mscale_all_dim", None)
        if not (mscale and mscale_all):  # HF ignores the pair unless both are non-zero
            mscale = mscale_all = None
        attention_factor = take("attention_factor", None)
        if attention_factor is not None and not math.isclose(attention_factor, _yarn_concentration(factor, mscale, mscale_all)):
            raise fail(f"{src}.attention_factor", f"is {attention_factor}; megatron derives the YaRN scale from factor/mscale only")
        out.update(position_embedding_type="yarn", yarn_rotary_scaling_factor=factor,
                   yarn_original_max_position_embeddings=orig, yarn_beta_fast=float(take("beta_fast", 32) or 32),
                   yarn_beta_slow=float(take("beta_slow", 1) or 1), yarn_mscale=mscale, yarn_mscale_all_dim=mscale_all,
                   yarn_correction_range_round_to_int=bool(take("truncate", True)))
    elif rope_type != "default":
        raise fail(f"{src}.rope_type", f"{rope_type!r} is not supported (default, linear, llama3, yarn are)")
    for key in sorted(merged):
        raise fail(f"{src}.{key}", f"not understood for rope_type {rope_type!r}")
    return out


def refuse_partial_yarn(k: Any, fields: dict[str, Any]) -> None:
    """YaRN over part of each head (StableLM, Nemotron defaults) is refused: megatron's YaRN rotates every channel."""
    if fields.get("position_embedding_type") == "yarn" and fields.get("rotary_percent", 1.0) < 1.0:
        key = "rope_scaling" if k.cfg.get("rope_scaling") else "rope_parameters"
        raise k.fail(f"{key}.rope_type", f"'yarn' with partial_rotary_factor {fields['rotary_percent']}: megatron's "
                                         "YaRN rotates every channel of the head")


def rope_parameters_to_hf(f: dict[str, Any], arch: str, *, partial_rotary: bool = False) -> dict[str, Any]:
    """HF ``rope_parameters`` for megatron fields ``f`` (rope or yarn position embeddings).

    With ``partial_rotary`` the ``rotary_percent`` is always written as ``partial_rotary_factor``
    (config classes such as StableLM's default it to something other than 1).
    """
    if not partial_rotary:
        need_value(f, "rotary_percent", (1, 1.0), arch, 1.0)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": f.get("rotary_base", DEFAULT_ROPE_THETA)}
    if partial_rotary:
        rope["partial_rotary_factor"] = float(f.get("rotary_percent", 1.0))
    interp = f.get("seq_len_interpolation_factor")
    if interp is not None and (f.get("rope_scaling") or f["position_embedding_type"] == "yarn"):
        raise UnsupportedConfigError("seq_len_interpolation_factor", "cannot be combined with llama-3 or YaRN scaling in HF")
    if f["position_embedding_type"] == "yarn":
        mscale, mscale_all = f.get("yarn_mscale"), f.get("yarn_mscale_all_dim")
        rope.update(rope_type="yarn", factor=f["yarn_rotary_scaling_factor"],
                    original_max_position_embeddings=f["yarn_original_max_position_embeddings"],
                    beta_fast=f.get("yarn_beta_fast", 32.0), beta_slow=f.get("yarn_beta_slow", 1.0),
                    truncate=f.get("yarn_correction_range_round_to_int", True))
        if mscale is not None and mscale_all is not None:
            if not (mscale and mscale_all):
                raise UnsupportedConfigError("yarn_mscale_all_dim", "HF ignores the mscale pair when either is 0")
            rope.update(mscale=mscale, mscale_all_dim=mscale_all)
    elif f.get("rope_scaling"):
        rope.update(rope_type="llama3", factor=f.get("rope_scaling_factor", 8.0), **MEGATRON_LLAMA3_ROPE)
    elif interp is not None:
        rope.update(rope_type="linear", factor=interp)
    return rope
