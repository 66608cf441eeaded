"""Text form of the values a TransformerConfig holds: dtypes, enums, callables.

Callables are stored as import paths (``"torch.nn.functional:silu"``), partials
as ``{"function": path, "args": [...], "kwargs": {...}}``, dtypes by name
(``"bfloat16"``), enums by member name. Decoding is driven by the field's
type hint, so hand-written YAML can use the same short forms.
"""

from __future__ import annotations

import enum
import functools
import typing
from typing import Any

from plugtron.records import import_path_of, resolve


def encode(value: Any) -> Any:
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


def _decode_callable(value: Any) -> Any:
    if isinstance(value, str):
        return resolve(value)
    if isinstance(value, dict) and "function" in value:
        return functools.partial(resolve(value["function"]), *value.get("args", []), **value.get("kwargs", {}))
    return value


def _kinds(hint: Any) -> set[Any]:
    """Flatten Optional/Union/Annotated into the set of concrete hints."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or str(origin) == "types.UnionType":
        return set().union(*(_kinds(a) for a in typing.get_args(hint)))
    if origin is typing.Annotated:
        return _kinds(typing.get_args(hint)[0])
    return {hint}


def decode(hint: Any, value: Any) -> Any:
    """Turn a stored value back into what the field with type ``hint`` holds."""
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
    if any(typing.get_origin(k) is not None and "Callable" in str(k) or k is typing.Callable for k in kinds):
        return _decode_callable(value)
    if any(str(k).startswith("typing.Callable") or str(k).startswith("collections.abc.Callable") for k in kinds):
        return _decode_callable(value)
    return value
