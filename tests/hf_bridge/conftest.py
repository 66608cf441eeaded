"""Fixtures every HF bridge test module shares."""

from __future__ import annotations

import warnings
from typing import Iterator

import pytest

from plugtron import PlugtronPluginManager


@pytest.fixture(scope="module")
def pm() -> PlugtronPluginManager:
    """One plugin manager per module, with the installed plugins (the families' converters among them)."""
    return PlugtronPluginManager()


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    """megatron's and transformers' notices are not what these tests look at (``pytest.warns`` still sees warnings)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
