"""Suite-wide rules: GPU tests skip cleanly where there is no CUDA."""

from __future__ import annotations

import warnings

import pytest

# megatron-core warns at import about optional GPU packages (apex, TE); noise here.
warnings.filterwarnings("ignore", module=r"megatron\.")


def pytest_collection_modifyitems(config, items):
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (GPU paths are written against the real APIs; not run here)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
