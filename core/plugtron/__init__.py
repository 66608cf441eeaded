"""plugtron: model-family plugins and one shared build pipeline for megatron-core.

Importing this package is cheap: torch and megatron are imported only by the
names resolved lazily below (``build_model``, ``ModelConfig`` ...).
"""

from __future__ import annotations

import importlib
from typing import Any

from plugtron._markers import hookimpl, hookspec
from plugtron.errors import (
    ConfigError,
    DuplicateRegistrationError,
    LayerSpecError,
    PipelineError,
    PluginError,
    PlugtronError,
    UnknownFamilyError,
)
from plugtron.manager import PluginRecord, PlugtronPluginManager, get_plugin_manager
from plugtron.records import Availability, ConverterInfo, FamilyInfo, LayerSpecInfo

__version__ = "0.1.0"

_LAZY = {
    "BuildContext": "plugtron.builder",
    "BuildOptions": "plugtron.builder",
    "ModelBuilder": "plugtron.builder",
    "ModelConfig": "plugtron.config",
    "model_config": "plugtron.config",
    "load_config": ("plugtron.config", "load"),
    "save_config": ("plugtron.config", "save"),
    "build_model": "plugtron.pipeline",
    "BuiltModel": "plugtron.pipeline",
    "initialize_parallel": "plugtron.runtime.parallel",
    "destroy_parallel": "plugtron.runtime.parallel",
    "ParallelContext": "plugtron.runtime.parallel",
}


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'plugtron' has no attribute '{name}'")
    module, attr = target if isinstance(target, tuple) else (target, name)
    return getattr(importlib.import_module(module), attr)


__all__ = [
    "Availability", "BuildContext", "BuildOptions", "BuiltModel", "ConfigError", "ConverterInfo",
    "DuplicateRegistrationError", "FamilyInfo", "LayerSpecError", "LayerSpecInfo", "ModelBuilder",
    "ModelConfig", "ParallelContext", "PipelineError", "PluginError", "PluginRecord", "PlugtronError",
    "PlugtronPluginManager", "UnknownFamilyError", "build_model", "destroy_parallel", "get_plugin_manager",
    "hookimpl", "hookspec", "initialize_parallel", "load_config", "model_config", "save_config",
]
