"""Which quantised Hugging Face checkpoints an architecture accepts: ``quantization_config``.

Config-level only, torch-free: architecture modules (the families') call
:func:`accept` from their config reader, and the HF engine calls
:func:`scheme_of` before it dequantises (``plugtron_hf_bridge.quantization`` does
the arithmetic). It lives in the core because both sides need it and plugins
never import each other.

- :data:`FP8`, :data:`MXFP4`, :data:`METHODS`: the ``quant_method`` values read.
- :func:`accept` ``(k, methods=(FP8,))``: reads (and marks as understood)
  ``quantization_config`` of the :class:`~plugtron.conversion.ConfigReader` ``k``;
  None when absent, else the :class:`Scheme`; refuses a method outside ``methods``
  or any key/value it does not understand (``UnsupportedConfigError`` naming
  ``quantization_config.<key>`` and the value). :func:`accepts`: the same on a dict.

Refused: per-tensor FP8 (no ``weight_block_size``), static activation scales
(``activation_scheme: static`` ships ``input_scale`` tensors), formats other than e4m3.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Mapping, NamedTuple

from .errors import UnsupportedConfigError

if TYPE_CHECKING:
    from .hf_keys import ConfigReader

FP8 = "fp8"
MXFP4 = "mxfp4"
#: ``quant_method`` values the engine understands.
METHODS = (FP8, MXFP4)
KEY = "quantization_config"
_LISTS = ("modules_to_not_convert", "ignored_layers")  # unquantised modules: they simply have no scale


class Scheme(NamedTuple):
    """A validated ``quantization_config``: the method and, for FP8, the block (rows, cols)."""

    method: str
    block: tuple[int, int] = (0, 0)


def accept(k: "ConfigReader", methods: Iterable[str] = (FP8,)) -> Scheme | None:
    """For an architecture's config reader: its ``quantization_config``, if any, validated (see the module doc)."""
    return accepts(k.raw(KEY), methods, source=k.source)


def accepts(quantization_config: Any, methods: Iterable[str] = (FP8,), *, source: str | None = None) -> Scheme | None:
    """``quantization_config`` as a :class:`Scheme` (None when absent), its method one of ``methods``."""
    qc = quantization_config
    if qc is None:
        return None
    if not isinstance(qc, Mapping):
        raise UnsupportedConfigError(KEY, f"is {qc!r:.100}; expected a JSON object", source=source)
    methods = tuple(methods)
    method = qc.get("quant_method")
    if method not in methods:
        raise _fail("quant_method", method, f"this architecture reads only {list(methods)} checkpoints", source)
    if method == FP8:
        return _fp8(qc, source)
    return _mxfp4(qc, source)


def scheme_of(hf_config: Mapping[str, Any], source: str | None = None) -> Scheme | None:
    """The engine's check of ``config.json``'s ``quantization_config`` (None when it has none)."""
    return accepts(hf_config.get(KEY), METHODS, source=source)


def _fail(key: str, value: Any, why: str, source: str | None) -> UnsupportedConfigError:
    return UnsupportedConfigError(f"{KEY}.{key}", f"is {value!r:.100}; {why}", source=source)


def _fp8(qc: Mapping[str, Any], source: str | None) -> Scheme:
    allowed = {"quant_method", "fmt", "activation_scheme", "weight_block_size", "scale_fmt", "dequantize", *_LISTS}
    for key in sorted(set(qc) - allowed):
        raise _fail(key, qc[key], "unknown FP8 setting; refusing to guess what it changes", source)
    if qc.get("fmt", "e4m3") != "e4m3":
        raise _fail("fmt", qc["fmt"], "only e4m3 FP8 weights are read", source)
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise _fail("activation_scheme", qc["activation_scheme"],
                    "static activation scales (input_scale tensors) are not read; only 'dynamic'", source)
    if qc.get("scale_fmt") not in (None, "ue8m0"):  # ue8m0: the float32 scales are powers of two; same arithmetic
        raise _fail("scale_fmt", qc["scale_fmt"], "only float scales (absent or 'ue8m0') are read", source)
    block = qc.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise _fail("weight_block_size", block, "block-scaled FP8 needs [rows, cols] of positive integers "
                    "(per-tensor FP8 is not read)", source)
    _check_lists(qc, source)
    return Scheme(FP8, (block[0], block[1]))


def _mxfp4(qc: Mapping[str, Any], source: str | None) -> Scheme:
    for key in sorted(set(qc) - {"quant_method", "dequantize", *_LISTS}):
        raise _fail(key, qc[key], "unknown MXFP4 setting; refusing to guess what it changes", source)
    _check_lists(qc, source)
    return Scheme(MXFP4)


def _check_lists(qc: Mapping[str, Any], source: str | None) -> None:
    for key in _LISTS:
        value = qc.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise _fail(key, value, "expected a list of module names", source)
