"""The core's own plugin: the last-resort builder factory."""

from __future__ import annotations

from typing import Any

from plugtron._markers import hookimpl


@hookimpl(trylast=True)
def plugtron_create_builder(config: Any, family: Any) -> Any:
    """Instantiate the family's declared builder class with the config."""
    return family.load_builder_class()(config)
