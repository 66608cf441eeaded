"""Choosing a layer spec: the user's named choice, or ``auto``.

The one place this decision is made, for every family: ``auto`` takes the
available spec with the highest priority, and the reason for the choice (and
for skipping the better ones) is reported to the user.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from plugtron.errors import LayerSpecError
from plugtron.records import Availability, LayerSpecInfo

if TYPE_CHECKING:
    from plugtron.manager import PlugtronPluginManager

AUTO = "auto"


@attrs.frozen
class SpecChoice:
    info: LayerSpecInfo
    reason: str


def describe_specs(pm: "PlugtronPluginManager", family: str) -> list[tuple[LayerSpecInfo, Availability]]:
    """Every spec offered for ``family`` with its availability, best first."""
    return [(info, info.availability()) for info in pm.layer_specs(family)]


def _no_specs(pm: "PlugtronPluginManager", family: str) -> str:
    """The error for a family without specs names the hook and the record to return from it,
    since this is the first thing a new family's author meets after registering the family."""
    provider = pm.tables.families.get(family)
    who = f" (provided by plugin '{provider.plugin}')" if provider else ""
    example = {"family": repr(family), "name": "'local'", "factory": "'pkg.specs:make_spec'", "check": "'pkg.specs:available'"}
    fields = ", ".join(
        f"{f.name}={example.get(f.name, '...' if f.default is attrs.NOTHING else repr(f.default))}"
        for f in attrs.fields(LayerSpecInfo) if f.name not in ("distribution", "plugin")
    )
    return (
        f"no layer specs are registered for family '{family}'{who}; register one from the hook "
        f"plugtron_register_layer_specs(), which returns a list of LayerSpecInfo({fields}); "
        f"make_spec(config) returns the layer spec, available() an Availability (see plugtron.hookspecs)"
    )


def select_layer_spec(pm: "PlugtronPluginManager", family: str, requested: str = AUTO) -> SpecChoice:
    specs = describe_specs(pm, family)
    if not specs:
        raise LayerSpecError(_no_specs(pm, family))
    if requested != AUTO:
        for info, available in specs:
            if info.name == requested:
                if not available.ok:
                    raise LayerSpecError(f"layer spec '{requested}' of family '{family}' is unavailable here: {available.reason}")
                return SpecChoice(info, f"requested; {available.reason}")
        names = ", ".join(info.name for info, _ in specs)
        raise LayerSpecError(f"family '{family}' has no layer spec '{requested}' (offered: {names}, or auto)")
    skipped = []
    for info, available in specs:
        if available.ok:
            why = f"auto: best available ({available.reason})"
            if skipped:
                why += "; skipped " + "; ".join(skipped)
            return SpecChoice(info, why)
        skipped.append(f"{info.name}: {available.reason}")
    raise LayerSpecError(f"no layer spec of family '{family}' is available here: " + "; ".join(skipped))
