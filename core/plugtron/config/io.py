"""Saving and loading model configs (JSON or YAML) with cattrs.

A saved config is one flat mapping: ``family``, the family's own fields, and
the TransformerConfig keywords that were set. Callables are import paths.

Config files are untrusted (``plugtron build FILE``, the config of a
downloaded checkpoint): they are read size-capped as regular files only, YAML
only through ``yaml.safe_load``, JSON without duplicate keys, and a callable
field loads only a path on the closed allowlist (see :mod:`._codec`), which
installed plugins extend with ``FamilyInfo.config_callables``. Nothing a file
says is ever imported otherwise: the family's config class comes from the
plugin registry, not from the file.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import cattrs

from plugtron._atomic import atomic_write_text
from plugtron.config import _codec
from plugtron.config.base import ModelConfig, _suggest
from plugtron.errors import ConfigError
from plugtron.untrusted import UntrustedFileError, parse_json_strict, read_bytes_capped, regular_file_inside

if TYPE_CHECKING:
    from plugtron.manager import PlugtronPluginManager

DEFAULT_FILENAME = "plugtron_model.json"
#: Real model configs are a few kilobytes; the cap bounds memory for a huge or endless file.
MAX_CONFIG_BYTES = 4 * 2**20
_converter = cattrs.Converter()


def allowed_callables(pm: "PlugtronPluginManager") -> frozenset[str]:
    """The core allowlist plus every ``config_callables`` path the registered families declare."""
    return _codec.union(path for family in pm.tables.families.values() for path in family.config_callables)


def to_dict(config: ModelConfig) -> dict[str, Any]:
    own = {f.name: _converter.unstructure(getattr(config, f.name)) for f in attrs.fields(type(config))}
    tc = {k: _codec.encode(v) for k, v in sorted(config.transformer_kwargs.items())}
    return {"family": config.family, **own, **tc}


def from_dict(data: dict[str, Any], pm: "PlugtronPluginManager | None" = None, *, source: str = "config") -> ModelConfig:
    from plugtron.manager import get_plugin_manager

    data = dict(data)
    family = data.pop("family", None)
    if not family:
        raise ConfigError("family", f"{source} does not say which model family it is for")
    pm = pm or get_plugin_manager()
    cls = pm.family(family).load_config_class()
    attrs.resolve_types(cls)
    own = attrs.fields_dict(cls)
    hints = cls.transformer_field_types()
    allowed = allowed_callables(pm)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        try:
            if key in own:
                kwargs[key] = _converter.structure(value, own[key].type)
            elif key in hints:
                kwargs[key] = _codec.decode(hints[key], value, allowed)
            else:
                raise ConfigError(key, f"unknown field in {source}" + _suggest(key, list(own) + list(hints)), config=cls.__name__)
        except ConfigError:
            raise
        except _codec.CallableNotAllowed as exc:
            raise ConfigError(key, f"refused in {source}: {exc}", config=cls.__name__) from None
        except Exception as exc:
            raise ConfigError(key, f"invalid value {value!r} in {source}: {exc}", config=cls.__name__) from exc
    return cls(**kwargs)


def _is_yaml(path: Path) -> bool:
    return path.suffix.lower() in {".yaml", ".yml"}


def _check_loadable(config: ModelConfig, data: dict[str, Any], pm: "PlugtronPluginManager | None") -> None:
    """Refuse to write a callable that :func:`load` would refuse: fail at save, not on someone else's load."""
    hints = config.transformer_field_types()
    stored = {k: data[k] for k in config.transformer_kwargs
              if data[k] is not None and _codec.is_callable_hint(hints[k])}
    allowed = _codec.CORE_CALLABLES
    if any((v.get("function") if isinstance(v, dict) else v) not in allowed for v in stored.values()):
        from plugtron.manager import get_plugin_manager  # only now pay for loading the plugin registry

        allowed = allowed_callables(pm or get_plugin_manager())
    for key, value in stored.items():
        try:
            _codec.check_callable(value, allowed)
        except _codec.CallableNotAllowed as exc:
            raise ConfigError(key, f"cannot be saved: {exc}", config=type(config).__name__) from None


def save(config: ModelConfig, path: str | Path = DEFAULT_FILENAME, pm: "PlugtronPluginManager | None" = None) -> Path:
    """Write atomically; ``.yaml``/``.yml`` give YAML, anything else JSON.

    A callable :func:`load` would refuse (not on the allowlist, or a partial
    with non-scalar arguments) is an error here, before anything is written.
    """
    path = Path(path)
    if path.is_dir():
        path = path / DEFAULT_FILENAME
    data = to_dict(config)
    _check_loadable(config, data, pm)
    if _is_yaml(path):
        import yaml

        text = yaml.safe_dump(data, sort_keys=False)
    else:
        text = json.dumps(data, indent=2) + "\n"
    atomic_write_text(path, text)
    return path


def _config_file(path: Path) -> Path:
    """``path`` or a directory's default file, refused unless it is a regular file (checked before opening).

    Inside a directory (a checkpoint) the default file must also stay inside
    it: a ``plugtron_model.json`` linking elsewhere is refused, not followed.
    """
    if path.is_dir():
        return regular_file_inside(path, DEFAULT_FILENAME) or path / DEFAULT_FILENAME
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block in open(), /dev/zero never ends
        raise UntrustedFileError(path, "is not a regular file (device, FIFO, socket or directory); refusing to read it")
    return path


def _read(path: Path) -> tuple[Path, bytes]:
    """The config file and its bytes, capped at :data:`MAX_CONFIG_BYTES`; errors are ConfigErrors naming it."""
    try:
        path = _config_file(path)
        return path, read_bytes_capped(path, MAX_CONFIG_BYTES)
    except OSError as exc:
        raise ConfigError("path", f"cannot read config file {path}: {exc.strerror}") from exc
    except UntrustedFileError as exc:
        raise ConfigError("path", f"cannot read config file {exc.path}: {exc.problem}") from exc


def load(path: str | Path, pm: "PlugtronPluginManager | None" = None) -> ModelConfig:
    """Read a config file (or a directory's ``plugtron_model.json``); see the module doc for what is refused."""
    path, raw = _read(Path(path))
    try:
        if _is_yaml(path):
            import yaml

            data = yaml.safe_load(raw)
        else:
            data = parse_json_strict(raw, path)
    except UntrustedFileError as exc:
        raise ConfigError("path", f"{path} is not valid JSON: {exc.problem.removeprefix('is not valid JSON: ')}") from exc
    except Exception as exc:
        raise ConfigError("path", f"{path} is not valid {'YAML' if _is_yaml(path) else 'JSON'}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError("path", f"{path} must hold a mapping of field names to values")
    return from_dict(data, pm, source=str(path))
