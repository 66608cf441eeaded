"""Saving and loading model configs (JSON or YAML) with cattrs.

A saved config is one flat mapping: ``family``, the family's own fields, and
the TransformerConfig keywords that were set. Callables are import paths.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import cattrs

from plugtron._atomic import atomic_write_text
from plugtron.config import _codec
from plugtron.config.base import ModelConfig, _suggest
from plugtron.errors import ConfigError

if TYPE_CHECKING:
    from plugtron.manager import PlugtronPluginManager

DEFAULT_FILENAME = "plugtron_model.json"
_converter = cattrs.Converter()


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
    cls = (pm or get_plugin_manager()).family(family).load_config_class()
    attrs.resolve_types(cls)
    own = attrs.fields_dict(cls)
    hints = cls.transformer_field_types()
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        try:
            if key in own:
                kwargs[key] = _converter.structure(value, own[key].type)
            elif key in hints:
                kwargs[key] = _codec.decode(hints[key], value)
            else:
                raise ConfigError(key, f"unknown field in {source}" + _suggest(key, list(own) + list(hints)), config=cls.__name__)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(key, f"invalid value {value!r} in {source}: {exc}", config=cls.__name__) from exc
    return cls(**kwargs)


def _is_yaml(path: Path) -> bool:
    return path.suffix.lower() in {".yaml", ".yml"}


def save(config: ModelConfig, path: str | Path = DEFAULT_FILENAME) -> Path:
    """Write atomically; ``.yaml``/``.yml`` give YAML, anything else JSON."""
    path = Path(path)
    if path.is_dir():
        path = path / DEFAULT_FILENAME
    data = to_dict(config)
    if _is_yaml(path):
        import yaml

        text = yaml.safe_dump(data, sort_keys=False)
    else:
        text = json.dumps(data, indent=2) + "\n"
    atomic_write_text(path, text)
    return path


def load(path: str | Path, pm: "PlugtronPluginManager | None" = None) -> ModelConfig:
    path = Path(path)
    if path.is_dir():
        path = path / DEFAULT_FILENAME
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError("path", f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        if _is_yaml(path):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:
        raise ConfigError("path", f"{path} is not valid {'YAML' if _is_yaml(path) else 'JSON'}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError("path", f"{path} must hold a mapping of field names to values")
    return from_dict(data, pm, source=str(path))
