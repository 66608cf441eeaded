"""Text form of the values a TransformerConfig holds: dtypes, enums, callables.

Callables are stored as import paths (``"torch.nn.functional:silu"``), partials
as ``{"function": path, "args": [...], "kwargs": {...}}``, dtypes by name
(``"bfloat16"``), enums by member name. Decoding is driven by the field's
type hint, so hand-written YAML can use the same short forms.

A config file is data from a stranger (``plugtron build FILE``, the
``plugtron_model.json`` of a downloaded checkpoint), so it may *name* a
callable but never *choose code*: a path must be exactly one of
:data:`CORE_CALLABLES` or of those an installed plugin declares
(``FamilyInfo.config_callables``). The check is a string comparison made
before anything is imported, the import reaches one module-level attribute
(no ``torch.hub:os.system`` walks), and partial arguments are plain numbers,
booleans or None (plus the few enumerated strings of :data:`STRING_CHOICES`).
"""

from __future__ import annotations

import collections.abc
import difflib
import enum
import functools
import importlib
import typing
from typing import Any, Iterable

from plugtron.records import import_path_of

#: Activations megatron-core ships or special-cases (``mlp.py`` fuses silu/gelu/
#: quick_gelu, MoE experts fuse squared_relu, ``transformer_config`` checks gelu
#: and quick_gelu), and the plain torch ones configs and converters use.
ACTIVATIONS: tuple[str, ...] = (
    "torch.nn.functional:silu",  # SwiGLU (Llama, Mistral, Qwen) with gated_linear_unit
    "torch.nn.functional:gelu",  # megatron's default activation, as users write it
    "torch._C._nn:gelu",  # the same F.gelu: a builtin whose own path is this, so saved files hold it
    "torch.nn.functional:relu",  # HF "relu" (hf_bridge) and plain ReLU MLPs
    "megatron.core.activations:squared_relu",  # Nemotron-H relu2 MLPs (mamba family)
    "megatron.core.activations:quick_gelu",  # megatron's quick-GELU
    "megatron.core.activations:fast_gelu",  # megatron's tanh GELU
    "megatron.core.fusions.fused_bias_geglu:quick_gelu",  # the one TransformerConfig/MLP compare against
    "megatron.core.transformer.utils:openai_gelu",  # Megatron-LM --openai-gelu
    "megatron.core.transformer.utils:erf_gelu",  # Megatron-LM --onnx-safe
    "plugtron.activations:gelu_tanh",  # GPT-2's gelu_new / HF gelu_pytorch_tanh (converters)
)

#: Weight initializers for ``init_method``, ``output_layer_init_method`` and
#: ``embedding_init_method``. megatron's own defaults are partials of
#: ``normal_`` (what ``megatron.core.utils.init_method_normal`` returns, so the
#: factories themselves are not listed: stored as init methods they would be
#: called with the weight and never initialize it).
INIT_METHODS: tuple[str, ...] = tuple(
    f"torch.nn.init:{name}"
    for name in (
        "normal_", "trunc_normal_", "uniform_", "constant_", "zeros_", "ones_",
        "xavier_normal_", "xavier_uniform_", "kaiming_normal_", "kaiming_uniform_",
    )
)

#: Every callable a config file may name without a plugin declaring it.
CORE_CALLABLES: frozenset[str] = frozenset(ACTIVATIONS + INIT_METHODS)

_GELU_APPROXIMATE = {"approximate": frozenset({"none", "tanh"})}
_KAIMING = {
    "mode": frozenset({"fan_in", "fan_out"}),
    "nonlinearity": frozenset({"linear", "sigmoid", "tanh", "relu", "leaky_relu", "selu"}),
}

#: The only string arguments a partial may carry: function -> keyword -> the
#: values torch documents. ``partial(F.gelu, approximate="tanh")`` is GPT-2's
#: activation; any other string in a partial is refused.
STRING_CHOICES: dict[str, dict[str, frozenset[str]]] = {
    "torch.nn.functional:gelu": _GELU_APPROXIMATE,
    "torch._C._nn:gelu": _GELU_APPROXIMATE,
    "torch.nn.init:kaiming_normal_": _KAIMING,
    "torch.nn.init:kaiming_uniform_": _KAIMING,
}

_PARTIAL_KEYS = frozenset({"function", "args", "kwargs"})
_SCALARS = (bool, int, float, type(None))


class CallableNotAllowed(ValueError):
    """A stored callable a config may not hold; the loader reports it as a ConfigError on the field."""


# -- encoding ----------------------------------------------------------------------------


def encode(value: Any) -> Any:
    """The plain-data form of a field value (what :func:`decode` reads back)."""
    import torch

    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, functools.partial):
        return {
            "function": import_path_of(value.func),
            "args": [encode(a) for a in value.args],
            "kwargs": {k: encode(v) for k, v in value.keywords.items()},
        }
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    if callable(value) and not isinstance(value, type(None)):
        return import_path_of(value)
    return value


# -- checking (no imports) ---------------------------------------------------------------


def _refuse_path(path: str, allowed: frozenset[str]) -> CallableNotAllowed:
    close = difflib.get_close_matches(path, sorted(allowed), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return CallableNotAllowed(
        f"{path!r} is not a callable a config file may name{hint}; allowed: {', '.join(sorted(allowed))}. "
        "A plugin adds its own with FamilyInfo(config_callables=(...))"
    )


def _check_path(path: Any, allowed: frozenset[str]) -> str:
    if not isinstance(path, str):
        raise CallableNotAllowed(f"a callable is stored as an import path string, not {path!r}")
    if path not in allowed:
        raise _refuse_path(path, allowed)
    return path


def _check_argument(path: str, where: str, value: Any, keyword: str | None = None) -> None:
    """Numbers, booleans and None only: an argument must not smuggle in code, paths or shell text."""
    if isinstance(value, _SCALARS):
        return
    choices = STRING_CHOICES.get(path, {}).get(keyword or "")
    if isinstance(value, str) and choices is not None and value in choices:
        return
    allowed = f" or one of {sorted(choices)}" if choices else ""
    raise CallableNotAllowed(
        f"partial of '{path}': {where} is {value!r}; arguments must be numbers, booleans or null{allowed}"
    )


def _check_partial(value: dict[str, Any], allowed: frozenset[str]) -> tuple[str, list[Any], dict[str, Any]]:
    if set(value) - _PARTIAL_KEYS or "function" not in value:
        shape = "{'function': path, 'args': [...], 'kwargs': {...}}"
        raise CallableNotAllowed(f"a partial is {shape}, got keys {sorted(map(str, value))}")
    path = _check_path(value["function"], allowed)
    args, kwargs = value.get("args", []), value.get("kwargs", {})
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise CallableNotAllowed(f"partial of '{path}': 'args' must be a list and 'kwargs' a mapping")
    for index, arg in enumerate(args):
        _check_argument(path, f"args[{index}]", arg)
    for key, arg in kwargs.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise CallableNotAllowed(f"partial of '{path}': keyword {key!r} is not a name")
        _check_argument(path, f"kwargs[{key!r}]", arg, key)
    return path, args, kwargs


def check_callable(value: Any, allowed: frozenset[str]) -> tuple[str, list[Any], dict[str, Any]]:
    """``(path, args, kwargs)`` of a stored callable (empty for a bare path), or raise; imports nothing."""
    if isinstance(value, dict):
        return _check_partial(value, allowed)
    return _check_path(value, allowed), [], {}


# -- decoding ----------------------------------------------------------------------------


def _import_allowed(path: str) -> Any:
    """Import an already-allowed ``module:name``: one module, one attribute, nothing walked."""
    module_name, _, name = path.partition(":")
    try:
        target = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise CallableNotAllowed(f"'{path}' is allowed but cannot be imported here: {exc}") from exc
    if not callable(target):
        raise CallableNotAllowed(f"'{path}' is not callable")
    return target


def decode_callable(value: Any, allowed: frozenset[str] = CORE_CALLABLES) -> Any:
    """The function or partial a stored callable names, checked against ``allowed`` before any import."""
    path, args, kwargs = check_callable(value, allowed)
    target = _import_allowed(path)
    return functools.partial(target, *args, **kwargs) if isinstance(value, dict) else target


def _kinds(hint: Any) -> set[Any]:
    """Flatten Optional/Union/Annotated into the set of concrete hints."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or str(origin) == "types.UnionType":
        return set().union(*(_kinds(a) for a in typing.get_args(hint)))
    if origin is typing.Annotated:
        return _kinds(typing.get_args(hint)[0])
    return {hint}


def is_callable_hint(hint: Any) -> bool:
    """Whether a field of type ``hint`` holds a callable (``Callable``, ``Optional[Callable[..]]`` ...)."""
    return any(_is_callable(kind) for kind in _kinds(hint))


def _is_callable(kind: Any) -> bool:
    return kind is collections.abc.Callable or typing.get_origin(kind) is collections.abc.Callable


def decode(hint: Any, value: Any, allowed: frozenset[str] = CORE_CALLABLES) -> Any:
    """Turn a stored value back into what the field with type ``hint`` holds.

    Callables are decoded only from paths in ``allowed`` (see the module doc).
    """
    import torch

    if value is None:
        return None
    kinds = _kinds(hint)
    if torch.dtype in kinds and isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{value!r} is not a torch dtype")
        return dtype
    for kind in kinds:
        if isinstance(kind, type) and issubclass(kind, enum.Enum) and isinstance(value, str):
            return kind[value]
    if any(_is_callable(kind) for kind in kinds):
        return decode_callable(value, allowed)
    return value


def union(paths: Iterable[str]) -> frozenset[str]:
    """:data:`CORE_CALLABLES` plus ``paths`` (what installed plugins declare)."""
    return CORE_CALLABLES | frozenset(paths)
