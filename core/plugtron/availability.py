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
    for module, pip_name in requirements:
        if not module_present(module):
            return Availability.no(f"{module} is not installed (pip install {pip_name})")
    names = " and ".join(module for module, _ in requirements)
    if not cuda_present():
        verb = "is" if len(requirements) == 1 else "are"
        return Availability.no(f"{names} {verb} installed but CUDA is not available")
    return Availability.yes(f"{names} and CUDA present")
