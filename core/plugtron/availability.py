"""Cheap availability checks shared by every family's layer specs.

``module_present`` asks the import system without importing; ``cuda_present``
asks torch. Tests that show what ``auto`` would choose on a GPU machine replace
exactly these two functions (on this module) and nothing else.
"""

from __future__ import annotations

import importlib.util

from plugtron.records import Availability


def module_present(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def cuda_present() -> bool:
    import torch

    return torch.cuda.is_available()


def gpu_modules(*requirements: tuple[str, str]) -> Availability:
    """Available when every ``(module, pip name)`` is installed and CUDA is present."""
    missing = [(module, pip_name) for module, pip_name in requirements if not module_present(module)]
    if len(missing) == 1:
        return Availability.no(f"{missing[0][0]} is not installed (pip install {missing[0][1]})")
    if missing:
        return Availability.no("not installed: " + ", ".join(f"{m} (pip install {p})" for m, p in missing))
    names = " and ".join(module for module, _ in requirements)
    if not cuda_present():
        verb = "is" if len(requirements) == 1 else "are"
        return Availability.no(f"{names} {verb} installed but CUDA is not available")
    return Availability.yes(f"{names} and CUDA present")
