"""The two pluggy markers of the ``plugtron`` project name.

Plugins decorate their implementations with :data:`hookimpl`; only
:mod:`plugtron.hookspecs` uses :data:`hookspec`.
"""

from __future__ import annotations

import pluggy

PROJECT_NAME = "plugtron"
ENTRY_POINT_GROUP = "plugtron"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
