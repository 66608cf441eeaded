"""Collecting what plugins register into per-manager tables.

Registration hooks are called one implementation at a time so that a plugin
that raises is blamed by name and dropped, and so every record can be
stamped with the plugin and distribution that provided it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, TypeVar

import attrs

from plugtron.errors import DuplicateRegistrationError, PluginError
from plugtron.records import ConverterInfo, FamilyInfo, LayerSpecInfo

R = TypeVar("R")


@attrs.define
class Registries:
    families: dict[str, FamilyInfo] = attrs.field(factory=dict)
    layer_specs: dict[tuple[str, str], LayerSpecInfo] = attrs.field(factory=dict)
    converters: dict[tuple[str, str], ConverterInfo] = attrs.field(factory=dict)


def _who(record: Any) -> str:
    return f"plugin '{record.plugin}' (distribution {record.distribution or 'in-process'})"


def _claim(table: dict, key: Any, record: Any, what: str) -> None:
    previous = table.get(key)
    if previous is not None:
        raise DuplicateRegistrationError(
            f"{what} {key!r} is claimed twice: by {_who(previous)} and by {_who(record)}; "
            "uninstall one, or disable it with PLUGTRON_DISABLE_PLUGINS"
        )
    table[key] = record


def _results(impl: Any, expected: type[R]) -> list[R]:
    """Call one registration implementation and check what it returned."""
    result = impl.function()
    if result is None:
        return []
    items = list(result) if isinstance(result, Iterable) else [result]
    for item in items:
        if not isinstance(item, expected):
            raise PluginError(
                f"{impl.function.__qualname__} must return {expected.__name__} records, got {item!r}"
            )
    return items


def collect(
    hook_caller: Any,
    expected: type[R],
    describe: Callable[[str], tuple[str | None, str]],
    on_failure: Callable[[str, BaseException], None],
) -> list[R]:
    """Run every implementation of a registration hook; stamp the records.

    ``describe(plugin_name) -> (distribution, plugin_name)``; ``on_failure``
    decides whether a raising plugin is dropped (default) or fatal (strict).
    """
    records: list[R] = []
    for impl in reversed(hook_caller.get_hookimpls()):
        try:
            items = _results(impl, expected)
        except Exception as exc:  # noqa: BLE001 - a plugin's bug must not stop the host
            on_failure(impl.plugin_name, exc)
            continue
        distribution, plugin = describe(impl.plugin_name)
        records.extend(attrs.evolve(r, distribution=distribution, plugin=plugin) for r in items)
    return records


def build_registries(families: list[FamilyInfo], specs: list[LayerSpecInfo], converters: list[ConverterInfo]) -> Registries:
    tables = Registries()
    for family in families:
        _claim(tables.families, family.name, family, "model family")
    for spec in specs:
        _claim(tables.layer_specs, (spec.family, spec.name), spec, "layer spec")
    for conv in converters:
        _claim(tables.converters, conv.key, conv, "converter")
    return tables
