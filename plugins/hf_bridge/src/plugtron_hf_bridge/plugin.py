"""Registration of the HF bridge: its commands. No torch import here.

The bridge registers no architecture: each family registers its own
(``plugtron_register_converters`` records with ``source_format="hf"``), and
the engine finds them through the plugin manager.
"""

from __future__ import annotations

from typing import Any

from plugtron import hookimpl


@hookimpl
def plugtron_add_commands(commands: Any) -> None:
    from plugtron_hf_bridge import cli

    cli.add_parsers(commands)
