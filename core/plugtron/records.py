"""What plugins register: plain, torch-free records.

Classes and factories are named by import path ("package.module:attr") and
resolved only when used, so listing plugins never imports torch or megatron.

Trust: an import path in a record is *declared by an installed plugin*, code
the user chose to install, and :func:`resolve` follows it. A path *read from
a file* (a model config, a downloaded checkpoint) is never passed to
:func:`resolve`; config callables go through the closed allowlist of
:mod:`plugtron.config._codec`, which plugins extend with
:attr:`FamilyInfo.config_callables`.
"""

from __future__ import annotations

import importlib
import re
from typing import Any, Callable

import attrs


def resolve(path: str) -> Any:
    """Import ``"package.module:attr.sub"`` and return the attribute."""
    module_name, sep, qualname = path.partition(":")
    if not sep or not module_name or not qualname:
        raise ValueError(f"import path {path!r} must look like 'package.module:name'")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def import_path_of(obj: Any) -> str:
    """The inverse of :func:`resolve` for module-level functions and classes."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        raise ValueError(f"{obj!r} has no importable path (lambdas and local functions cannot be saved)")
    if resolve(f"{module}:{qualname}") is not obj:
        raise ValueError(f"{obj!r} is not reachable as {module}:{qualname}")
    return f"{module}:{qualname}"


_CALLABLE_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


def _callable_paths(value: Any) -> tuple[str, ...]:
    """A tuple of ``"package.module:function"`` paths; a bare string would silently split into letters."""
    if isinstance(value, str):
        raise TypeError(f"config_callables must be a tuple of import paths, not the string {value!r}")
    paths = tuple(value)
    for path in paths:
        if not isinstance(path, str) or not _CALLABLE_PATH.fullmatch(path):
            raise ValueError(
                f"config_callables entry {path!r} must look like 'package.module:function' "
                "(one module-level name, no attribute walk)"
            )
    return paths


@attrs.frozen
class FamilyInfo:
    """One model family: ``name`` is what configs record as their ``family``."""

    name: str
    config_class: str
    builder_class: str
    description: str = ""
    #: Functions, beyond the core allowlist (``plugtron.config._codec.CORE_CALLABLES``:
    #: torch/megatron activations and ``torch.nn.init`` methods), that a saved
    #: config may name in a callable field such as ``activation_func``, e.g.
    #: ``("my_pkg.acts:my_act",)``. Config files are untrusted, so only exact
    #: ``module:function`` paths listed here or in the core list load; every
    #: installed family's list extends the allowlist of every config.
    config_callables: tuple[str, ...] = attrs.field(default=(), converter=_callable_paths)
    #: Filled in by the plugin manager with the distribution of the plugin.
    distribution: str | None = None
    plugin: str | None = None

    def load_config_class(self) -> type:
        return resolve(self.config_class)

    def load_builder_class(self) -> type:
        return resolve(self.builder_class)


@attrs.frozen
class Availability:
    """Whether a layer spec can be used on this machine, and if not, why."""

    ok: bool
    reason: str = ""

    @classmethod
    def yes(cls, reason: str = "available") -> "Availability":
        return cls(True, reason)

    @classmethod
    def no(cls, reason: str) -> "Availability":
        return cls(False, reason)


@attrs.frozen
class LayerSpecInfo:
    """A named layer spec offered for a family.

    ``factory`` is an import path to ``factory(config) -> spec``; ``check`` an
    import path to ``check() -> Availability`` (cheap: find_spec, not import).
    ``priority`` orders candidates for ``auto``: the highest available wins.
    """

    family: str
    name: str
    factory: str
    check: str
    priority: int = 0
    description: str = ""
    cpu_capable: bool = False
    distribution: str | None = None
    plugin: str | None = None

    def availability(self) -> Availability:
        try:
            result = resolve(self.check)()
        except Exception as exc:  # a broken check means "not available", with the reason
            return Availability.no(f"availability check {self.check} failed: {exc!r}")
        if not isinstance(result, Availability):
            return Availability.no(f"availability check {self.check} returned {result!r}")
        return result

    def load_factory(self) -> Callable[..., Any]:
        return resolve(self.factory)


@attrs.frozen
class ConverterInfo:
    """A weight converter: (source format, architecture) -> family.

    ``adapter`` is an import path to an object the conversion engine of that
    format understands (for ``hf``: see ``plugtron_hf_bridge``).
    """

    source_format: str
    architecture: str
    family: str
    adapter: str
    description: str = ""
    distribution: str | None = None
    plugin: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.source_format, self.architecture)

    def load_adapter(self) -> Any:
        return resolve(self.adapter)
