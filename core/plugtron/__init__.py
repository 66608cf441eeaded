"""plugtron: model-family plugins and one shared build pipeline for megatron-core.

Importing this package is cheap: torch and megatron are imported only by the
names resolved lazily below (``build_model``, ``ModelConfig`` ...).
"""

from __future__ import annotations

import importlib
import os as _os
import sys as _sys
from typing import Any


def _keep_working_directory_off_path() -> None:
    """``python -m plugtron.cli`` without ``-P`` (torchrun's and srun's way of starting it): take the
    working directory off ``sys.path`` before the first dependency (pluggy) is imported, as plugtron's
    own launcher does with ``-P``, and keep it off for child processes (``PYTHONSAFEPATH``).

    Why here: this package is imported before any ``plugtron.*`` module runs, so a ``pluggy.py`` or
    ``torch.py`` in the folder a job starts in never shadows the real one. Only when the ``-m`` target
    is plugtron's own: a program that imports plugtron keeps its folder on the path.
    """
    argv = list(getattr(_sys, "orig_argv", ()))
    if _sys.flags.safe_path or "-m" not in argv[:-1]:
        return
    if argv[argv.index("-m") + 1].split(".")[0] != "plugtron":
        return
    if _sys.path and _sys.path[0] in ("", _os.getcwd()):
        del _sys.path[0]
    _os.environ["PYTHONSAFEPATH"] = "1"


_keep_working_directory_off_path()

from plugtron._markers import hookimpl, hookspec  # noqa: E402  (after the path is made safe)
from plugtron.errors import (  # noqa: E402
    ConfigError,
    DuplicateRegistrationError,
    LayerSpecError,
    PipelineError,
    PluginError,
    PlugtronError,
    UnknownFamilyError,
)
from plugtron.manager import PluginRecord, PlugtronPluginManager, get_plugin_manager  # noqa: E402
from plugtron.records import Availability, ConverterInfo, FamilyInfo, LayerSpecInfo  # noqa: E402

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
