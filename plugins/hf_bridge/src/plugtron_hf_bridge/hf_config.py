"""Reading an HF ``config.json`` safely, and naming its architecture.

What the keys *mean* is each architecture's business (the families'
architecture modules, written with :mod:`plugtron.conversion.hf_keys`); the
engine only reads the file and picks the architecture.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from plugtron.untrusted import read_json, regular_file_inside

from .errors import CheckpointFormatError, UnsupportedConfigError, checkpoint_errors

if TYPE_CHECKING:
    from plugtron.manager import PlugtronPluginManager

#: A causal LM's config.json is a few KB; the cap bounds memory for a huge or endless file.
MAX_CONFIG_BYTES = 4 * 2**20


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """Load ``config.json`` from a checkpoint directory (or the file itself).

    Read through :mod:`plugtron.untrusted`: it must be a regular file inside
    its directory (a link to ``/dev/zero`` or out of the directory is refused
    before reading), at most :data:`MAX_CONFIG_BYTES`, JSON without duplicate keys.
    """
    path = Path(path)
    directory, name = (path, "config.json") if path.is_dir() else (path.parent, path.name)
    with checkpoint_errors():
        file = regular_file_inside(directory, name, required=False)
        if file is None:
            raise CheckpointFormatError(directory / name, "config.json not found")
        data = read_json(file, max_bytes=MAX_CONFIG_BYTES, expect=None)
    if not isinstance(data, dict):
        raise CheckpointFormatError(file, "config.json is not a JSON object")
    return data


def architecture_from(hf_config: dict[str, Any], source: str, pm: "PlugtronPluginManager | None" = None) -> str:
    """``architectures[0]``; older configs without it are matched by ``model_type`` among the registered adapters."""
    archs = hf_config.get("architectures")
    if archs:
        if not isinstance(archs, list) or len(archs) != 1 or not isinstance(archs[0], str):
            raise UnsupportedConfigError("architectures", f"{archs!r} must name exactly one architecture", source=source)
        return archs[0]
    return _by_model_type(hf_config.get("model_type"), source, pm)


def _by_model_type(model_type: Any, source: str, pm: "PlugtronPluginManager | None") -> str:
    from plugtron.manager import get_plugin_manager

    from .adapter import FORMAT

    pm = pm or get_plugin_manager()
    known: dict[str, str] = {}
    for fmt, arch in sorted(pm.tables.converters):
        if fmt != FORMAT:
            continue
        try:
            declared = getattr(pm.converter(fmt, arch).load_adapter(), "model_type", None)
        except Exception:  # noqa: BLE001 - a broken third-party adapter must not hide the others
            continue
        if isinstance(declared, str):
            known.setdefault(declared, arch)
    if model_type not in known:
        raise UnsupportedConfigError("model_type", f"{model_type!r} is not one of {sorted(known)} and 'architectures' "
                                     "is missing", source=source)
    return known[model_type]
