"""Shared helpers for the core tests.

``fake_distribution`` writes a real (uninstalled) distribution into a temporary
directory: a ``*.dist-info`` folder with METADATA and entry_points.txt plus the
plugin module, and puts that directory on ``sys.path``. ``importlib.metadata``
then finds its entry points exactly as it finds those of installed packages.
"""

from __future__ import annotations

import importlib
import itertools
import sys
import textwrap
from pathlib import Path
from typing import Callable, Iterator

import attrs
import pytest

_serial = itertools.count(1)


@attrs.frozen
class FakeDistribution:
    root: Path
    distribution: str
    version: str
    entry_point: str
    module: str


@pytest.fixture
def fake_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., FakeDistribution]]:
    """``make(source, *, entry_point=None, distribution=None, version="0.0.1")``.

    ``source`` becomes the plugin module (uniquely named per call, so earlier
    imports never leak in); the entry point in group ``plugtron`` points at it.
    """
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    modules: list[str] = []

    def make(
        source: str,
        *,
        entry_point: str | None = None,
        distribution: str | None = None,
        version: str = "0.0.1",
    ) -> FakeDistribution:
        serial = next(_serial)
        module = f"plugtron_fake_plugin_{serial}_{tmp_path.name.replace('-', '_')}"
        entry_point = entry_point or f"fake{serial}"
        distribution = distribution or f"plugtron-fake-{serial}"
        (root / f"{module}.py").write_text(textwrap.dedent(source))
        info = root / f"{distribution.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[plugtron]\n{entry_point} = {module}\n")
        modules.append(module)
        importlib.invalidate_caches()  # the path finders and importlib.metadata cache directory listings
        return FakeDistribution(root, distribution, version, entry_point, module)

    yield make
    for module in modules:
        sys.modules.pop(module, None)
