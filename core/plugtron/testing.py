"""pytest fixtures for authors of plugtron plugins.

Installing plugtron makes this module a pytest plugin (entry point
``pytest11: plugtron.testing``), so the fixtures below are available in every
test suite without a ``conftest.py`` and without ``-p``. The entry point is
named like the module, so the explicit forms name the same plugin and work
too: ``pytest -p plugtron.testing``, ``pytest_plugins = ["plugtron.testing"]``
in a conftest, and ``-p no:plugtron.testing`` to switch the fixtures off.
pytest loads it for each run, so it imports only the standard library and
pytest here; plugtron's manager is imported when a fixture is first used, and
torch or megatron never.

Fixtures:

``plugtron_manager``
    A fresh :class:`~plugtron.PlugtronPluginManager` that ignores installed
    plugins and the process environment: only the core's builtin plugin is
    registered. ::

        def test_only_builtin(plugtron_manager):
            assert list(plugtron_manager.records) == ["plugtron"]

``plugtron_manager_factory``
    ``factory(load_entrypoints=True, env=None, plugins=()) -> manager``.
    Each call gives a new manager; ``env`` is the environment it reads
    ``PLUGTRON_PLUGINS`` / ``PLUGTRON_DISABLE_PLUGINS`` / ``PLUGTRON_STRICT``
    from (``None`` means an *empty* one, so the shell running the tests does
    not change their outcome). ``plugins`` are registered in-process after
    the entry points; an item may be a module, an importable module name, any
    object with hook functions, or a ``(name, plugin)`` pair. ::

        def test_only_gpt(plugtron_manager_factory):
            pm = plugtron_manager_factory(env={"PLUGTRON_PLUGINS": "gpt"})
            assert "gpt" in pm.tables.families

``register_plugin``
    ``register_plugin(plugin_or_functions..., name=None, distribution=None)``
    registers one plugin into ``plugtron_manager`` and returns that manager;
    everything it registered is unregistered at teardown. Pass a module, an
    object or class instance with hook methods, or one or more plain hook
    functions, which are bundled into a namespace first::

        from plugtron import FamilyInfo, hookimpl

        @hookimpl
        def plugtron_register_families():
            return [FamilyInfo("toy", "pkg.config:ToyConfig", "pkg.builder:ToyBuilder")]

        def test_my_family(register_plugin):
            pm = register_plugin(plugtron_register_families, name="mine")
            assert pm.family("toy").plugin == "mine"

``plugtron_single_rank`` (module scope)
    A one-process gloo group with megatron's model-parallel state at TP = PP = 1
    (:func:`plugtron.runtime.parallel.initialize_parallel`), which megatron's
    parallel layers need even on one CPU; the value is its ``ParallelContext``.
    At the end of the module it is torn down, but only if this fixture created
    the process group (a group an earlier module left behind is reused). ::

        def test_my_family_builds(plugtron_single_rank):
            built = build_model(my_config, parallel=plugtron_single_rank)
            assert built.report.params_per_rank[(0, 0)] > 0

Registration is not guarded: a misspelled hook or a duplicate family raises
:class:`~plugtron.PluginError` right in the test, which is what a plugin's
own tests want to see.
"""

from __future__ import annotations

import inspect
import itertools
import types
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

import pytest

if TYPE_CHECKING:
    from plugtron.manager import PlugtronPluginManager

__all__ = [
    "PluginNamespace",
    "plugin_namespace",
    "plugtron_manager",
    "plugtron_manager_factory",
    "plugtron_single_rank",
    "register_plugin",
]

_counter = itertools.count(1)


class PluginNamespace(types.SimpleNamespace):
    """A namespace of hook functions that compares by identity.

    ``SimpleNamespace`` compares equal by content, and pluggy refuses a
    plugin equal to one already registered; two bundles of the same
    functions are still two plugins.
    """

    __eq__ = object.__eq__
    __ne__ = object.__ne__
    __hash__ = object.__hash__


def plugin_namespace(*functions: Callable[..., Any], **named: Callable[..., Any]) -> PluginNamespace:
    """Bundle hook functions into one plugin object.

    Positional functions are stored under their ``__name__``; keywords under
    the keyword, which lets a test register a hook defined under another
    name. ::

        plugin = plugin_namespace(plugtron_register_families)
        plugin = plugin_namespace(plugtron_pre_wrap=record_chunks)
    """
    members: dict[str, Callable[..., Any]] = {}
    for function in functions:
        if not callable(function):
            raise TypeError(f"plugin_namespace() takes hook functions, got {function!r}")
        members[function.__name__] = function
    members.update(named)
    return PluginNamespace(**members)


def _as_plugin(items: tuple[Any, ...]) -> Any:
    """One plugin object from what a test passed to ``register_plugin``."""
    if not items:
        raise TypeError("register_plugin() needs a plugin object, a module or hook functions")
    if len(items) == 1 and not inspect.isfunction(items[0]):
        return items[0]
    return plugin_namespace(*items)


def _default_name(plugin: Any) -> str:
    if isinstance(plugin, types.ModuleType):
        return plugin.__name__
    return f"test-plugin-{next(_counter)}"


def _new_manager(*, load_entrypoints: bool, env: Mapping[str, str] | None) -> "PlugtronPluginManager":
    from plugtron.manager import PlugtronPluginManager

    return PlugtronPluginManager(load_entrypoints=load_entrypoints, env=dict(env or {}))


@pytest.fixture
def plugtron_manager() -> "PlugtronPluginManager":
    """A manager with no installed plugins and an empty environment (only the builtin)."""
    return _new_manager(load_entrypoints=False, env={})


@pytest.fixture
def plugtron_manager_factory() -> Callable[..., "PlugtronPluginManager"]:
    """Make managers with chosen entry-point loading, environment and in-process plugins."""

    def factory(
        load_entrypoints: bool = True,
        env: Mapping[str, str] | None = None,
        plugins: Iterable[Any] = (),
    ) -> "PlugtronPluginManager":
        pm = _new_manager(load_entrypoints=load_entrypoints, env=env)
        for item in plugins:
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                name, plugin = item
            else:
                name, plugin = None, item
            if isinstance(plugin, str):
                pm.register(plugin, name=name or plugin)
            else:
                pm.register(plugin, name=name or _default_name(plugin))
        return pm

    return factory


@pytest.fixture
def register_plugin(plugtron_manager: "PlugtronPluginManager") -> Iterator[Callable[..., "PlugtronPluginManager"]]:
    """Register plugins into ``plugtron_manager`` for one test; returns the manager."""
    registered: list[str] = []

    def register(*plugin: Any, name: str | None = None, distribution: str | None = None) -> "PlugtronPluginManager":
        obj = _as_plugin(plugin)
        plugin_name = name or _default_name(obj)
        plugtron_manager.register(obj, name=plugin_name, distribution=distribution)
        registered.append(plugin_name)
        return plugtron_manager

    yield register
    for plugin_name in reversed(registered):
        if plugtron_manager.pm.has_plugin(plugin_name):
            plugtron_manager.unregister(plugin_name)


@pytest.fixture(scope="module")
def plugtron_single_rank() -> Iterator[Any]:
    """One-rank gloo group + megatron parallel state (TP = PP = 1); see the module docstring."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch.distributed as dist

        from plugtron.runtime.parallel import destroy_parallel, initialize_parallel

        if dist.is_initialized() and dist.get_world_size() != 1:
            pytest.skip("torch.distributed is already initialised with several ranks")
        created = not dist.is_initialized()
        context = initialize_parallel(1, 1)
    yield context
    if created:
        destroy_parallel()
