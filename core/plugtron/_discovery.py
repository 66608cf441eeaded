"""Finding entry-point plugins and deciding, before import, which to load.

Kept apart from the manager so the selection rules (``PLUGTRON_PLUGINS``,
``PLUGTRON_DISABLE_PLUGINS``) live in one place and never import a plugin.
"""

from __future__ import annotations

import importlib.metadata as md
from typing import Mapping

import attrs

from plugtron._markers import ENTRY_POINT_GROUP

DISABLE_VAR = "PLUGTRON_DISABLE_PLUGINS"
SELECT_VAR = "PLUGTRON_PLUGINS"
STRICT_VAR = "PLUGTRON_STRICT"


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
            return f"disabled by {DISABLE_VAR}"
        if self.only and not keys & self.only:
            return f"not selected by {SELECT_VAR}"
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
