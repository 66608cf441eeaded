"""A typed facade over pluggy's untyped hook relay.

The rest of plugtron calls hooks only through :class:`Hooks`, so signatures are
checked by type checkers and the chaining rule of the wrap hooks lives here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

import attrs
import pluggy

from plugtron.errors import PluginError

if TYPE_CHECKING:
    from plugtron.builder import BuildContext, ModelBuilder
    from plugtron.records import FamilyInfo

WrapHook = Callable[[list, Any, "BuildContext"], "list | None"]


@attrs.frozen
class Replacement:
    """One plugin's replacement of one named part of a model (``plugtron_moe_submodules``).

    ``plugin`` is kept so that the family's checks can name who asked.
    """

    value: Any
    plugin: str


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

    def moe_submodules(self, config: Any, family: "FamilyInfo") -> dict[str, Replacement]:
        """Every plugin's MoE replacements, merged by part (``router``, ``experts`` ...).

        Not first-result: one plugin may replace the router and another the
        experts. Two plugins replacing the same part is an error naming both,
        since neither registration order nor ``tryfirst`` says which the user meant.
        """
        merged: dict[str, Replacement] = {}
        arguments = {"config": config, "family": family}
        for impl in reversed(self._relay.plugtron_moe_submodules.get_hookimpls()):
            if impl.hookwrapper or impl.wrapper:
                raise PluginError(f"plugin '{impl.plugin_name}': plugtron_moe_submodules answers with a dict and cannot be a wrapper")
            answer = impl.function(*(arguments[name] for name in impl.argnames))
            if answer is None:
                continue
            if not isinstance(answer, Mapping):
                raise PluginError(f"plugin '{impl.plugin_name}': plugtron_moe_submodules returned {type(answer).__name__}; expected a dict or None")
            for part, value in answer.items():
                if part in merged:
                    first, second = sorted((merged[part].plugin, impl.plugin_name))
                    raise PluginError(
                        f"plugins '{first}' and '{second}' both replace the MoE {part!r}; "
                        "unregister one (PLUGTRON_DISABLE_PLUGINS) or let one plugin return both"
                    )
                merged[part] = Replacement(value, impl.plugin_name)
        return merged

    def add_commands(self, commands: Any) -> None:
        self._relay.plugtron_add_commands(commands=commands)
