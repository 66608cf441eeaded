"""Finding entry-point plugins and deciding, before import, which to load.

Kept apart from the manager so the selection rules (``PLUGTRON_PLUGINS``,
``PLUGTRON_DISABLE_PLUGINS``) live in one place and never import a plugin.
"""

from __future__ import annotations

import difflib
import importlib.metadata as md
from typing import Iterable, Mapping

import attrs

from plugtron._markers import ENTRY_POINT_GROUP

DISABLE_VAR = "PLUGTRON_DISABLE_PLUGINS"
SELECT_VAR = "PLUGTRON_PLUGINS"
STRICT_VAR = "PLUGTRON_STRICT"
#: The statuses ``plugtron plugins`` shows for plugins the environment keeps out.
DISABLED = f"disabled by {DISABLE_VAR}"
NOT_SELECTED = f"not selected by {SELECT_VAR}"


@attrs.frozen
class Candidate:
    """An entry point in the ``plugtron`` group, not yet imported."""

    name: str
    value: str
    distribution: str
    version: str
    entry_point: md.EntryPoint


def _names(raw: str | None) -> frozenset[str]:
    return frozenset(part.strip() for part in (raw or "").split(",") if part.strip())


@attrs.frozen
class Selection:
    """Which plugins the environment allows. Names match the entry-point name
    or the distribution name, so ``plugtron-gpt`` and ``gpt`` both work."""

    only: frozenset[str] = frozenset()
    disabled: frozenset[str] = frozenset()

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "Selection":
        return cls(only=_names(env.get(SELECT_VAR)), disabled=_names(env.get(DISABLE_VAR)))

    def verdict(self, name: str, distribution: str | None) -> str | None:
        """``None`` when the plugin may load, else the status to report."""
        keys = {name} | ({distribution} if distribution else set())
        if keys & self.disabled:
            return DISABLED
        if self.only and not keys & self.only:
            return NOT_SELECTED
        return None

    def unknown_names(self, candidates: Iterable[Candidate]) -> list[str]:
        """One message per selected or disabled name that matches no installed plugin.

        A typo here would otherwise select nothing, or disable nothing, without a word.
        """
        known = sorted({c.name for c in candidates} | {c.distribution for c in candidates})
        entry_points = ", ".join(sorted({c.name for c in candidates})) or "none"
        messages = []
        for var, names in ((SELECT_VAR, self.only), (DISABLE_VAR, self.disabled)):
            for name in sorted(names - set(known)):
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                messages.append(f"{var} names '{name}', which is no installed plugin{hint}; installed: {entry_points}")
        return messages


def left_out_because(status: str) -> str | None:
    """For a plugin the environment kept out: the clause saying which variable did it, and the fix."""
    if status == DISABLED:
        return f"which {DISABLE_VAR} disables (remove it from {DISABLE_VAR} to load it)"
    if status == NOT_SELECTED:
        return f"which {SELECT_VAR} leaves out (add it to {SELECT_VAR} to load it)"
    return None


def strict_from_env(env: Mapping[str, str]) -> bool:
    return env.get(STRICT_VAR, "").strip().lower() in {"1", "true", "yes", "on"}


def find_candidates() -> list[Candidate]:
    """All entry points of the group, sorted by name for a stable order."""
    found = []
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist
        found.append(
            Candidate(
                name=ep.name,
                value=ep.value,
                distribution=dist.metadata["Name"] if dist else "?",
                version=dist.version if dist else "?",
                entry_point=ep,
            )
        )
    return sorted(found, key=lambda c: c.name)
