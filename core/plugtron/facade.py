"""A typed facade over pluggy's untyped hook relay.

The rest of plugtron calls hooks only through :class:`Hooks`, so signatures are
checked by type checkers and the chaining rule of the wrap hooks lives here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    from plugtron.builder import BuildContext, ModelBuilder
    from plugtron.records import FamilyInfo

WrapHook = Callable[[list, Any, "BuildContext"], "list | None"]


def run_chain(functions: list[tuple[str, WrapHook]], model: list, config: Any, context: "BuildContext") -> list:
    """Call each hook on the current chunk list; a returned list replaces it."""
    for owner, function in functions:
        result = function(model, config, context)
        if result is None:
            continue
        if not isinstance(result, (list, tuple)):
            raise TypeError(f"wrap hook of {owner} returned {type(result).__name__}; expected a list of chunks or None")
        model = list(result)
    return model


class Hooks:
    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._relay = pm.hook

    def create_builder(self, config: Any, family: "FamilyInfo") -> "ModelBuilder":
        return self._relay.plugtron_create_builder(config=config, family=family)

    def _ordered(self, hook_name: str) -> list[tuple[str, WrapHook]]:
        # pluggy calls the last entry of get_hookimpls() first; keep that order.
        impls = reversed(getattr(self._relay, hook_name).get_hookimpls())
        return [(f"plugin '{impl.plugin_name}'", impl.function) for impl in impls]

    def pre_wrap(self, model: list, config: Any, context: "BuildContext") -> list:
        return run_chain(self._ordered("plugtron_pre_wrap"), model, config, context)

    def post_wrap(self, model: list, config: Any, context: "BuildContext") -> list:
        return run_chain(self._ordered("plugtron_post_wrap"), model, config, context)

    def add_commands(self, commands: Any) -> None:
        self._relay.plugtron_add_commands(commands=commands)
