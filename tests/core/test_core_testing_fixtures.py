"""The pytest fixtures plugtron ships for plugin authors (``plugtron.testing``)."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from plugtron import FamilyInfo, LayerSpecInfo, PluginError, PlugtronPluginManager, hookimpl
from plugtron.testing import PluginNamespace, plugin_namespace


@hookimpl
def plugtron_register_families():
    return [FamilyInfo("fixture-family", "pkg.config:Config", "pkg.builder:Builder")]


@hookimpl
def plugtron_register_layer_specs():
    return [LayerSpecInfo("fixture-family", "plain", "pkg.specs:plain", "pkg.specs:available")]


def test_plugtron_manager_has_only_the_builtin(plugtron_manager):
    assert isinstance(plugtron_manager, PlugtronPluginManager)
    assert list(plugtron_manager.records) == ["plugtron"]
    assert plugtron_manager.tables.families == {}
    assert not plugtron_manager.strict


def test_plugtron_manager_ignores_the_process_environment(monkeypatch, request):
    monkeypatch.setenv("PLUGTRON_STRICT", "1")
    pm = request.getfixturevalue("plugtron_manager")
    assert not pm.strict


def test_register_plugin_bundles_functions_and_returns_the_manager(register_plugin, plugtron_manager):
    pm = register_plugin(plugtron_register_families, plugtron_register_layer_specs, name="bundle", distribution="my-dist")
    assert pm is plugtron_manager
    family = pm.family("fixture-family")
    assert (family.plugin, family.distribution) == ("bundle", "my-dist")
    assert [s.name for s in pm.layer_specs("fixture-family")] == ["plain"]
    assert pm.records["bundle"].source == "in-process"


def test_register_plugin_accepts_modules_instances_and_single_functions(register_plugin):
    module = types.ModuleType("fixture_module_plugin")
    module.plugtron_register_families = plugtron_register_families

    class Hooks:
        def __init__(self):
            self.calls = []

        @hookimpl
        def plugtron_pre_wrap(self, model, config, context):
            self.calls.append(list(model))

    instance = Hooks()
    pm = register_plugin(module)
    register_plugin(instance, name="instance")
    register_plugin(plugtron_register_layer_specs)  # one function, generated name
    assert "fixture_module_plugin" in pm.records
    assert pm.pm.get_plugin("instance") is instance
    assert any(name.startswith("test-plugin-") for name in pm.records)
    assert pm.hooks.pre_wrap([1, 2], config=None, context=None) == [1, 2]
    assert instance.calls == [[1, 2]]
    assert pm.family("fixture-family").plugin == "fixture_module_plugin"


def test_register_plugin_raises_plugin_errors_immediately(register_plugin):
    @hookimpl
    def plugtron_register_familes():
        return []

    with pytest.raises(PluginError, match="defines 'plugtron_register_familes', which matches no plugtron hook"):
        register_plugin(plugtron_register_familes, name="typo")
    with pytest.raises(TypeError, match="needs a plugin object, a module or hook functions"):
        register_plugin()


@pytest.fixture
def manager_checked_after_teardown(plugtron_manager):
    """Requested before ``register_plugin``, so it is torn down after it."""
    yield plugtron_manager
    assert list(plugtron_manager.records) == ["plugtron"]
    assert not plugtron_manager.pm.has_plugin("temporary")
    assert plugtron_manager.tables.families == {}


def test_register_plugin_unregisters_at_teardown(manager_checked_after_teardown, register_plugin):
    pm = register_plugin(plugtron_register_families, name="temporary")
    assert pm is manager_checked_after_teardown
    assert "fixture-family" in pm.tables.families


def test_unregistering_early_is_fine_for_the_teardown(manager_checked_after_teardown, register_plugin):
    pm = register_plugin(plugtron_register_families, name="temporary")
    pm.unregister("temporary")


def test_factory_defaults_load_installed_plugins_with_an_empty_environment(plugtron_manager_factory, monkeypatch):
    monkeypatch.setenv("PLUGTRON_DISABLE_PLUGINS", "example,gpt")
    pm = plugtron_manager_factory()
    assert pm.records["example"].status == "loaded"
    assert pm.records["gpt"].status == "loaded"


def test_factory_with_env_and_in_process_plugins(plugtron_manager_factory):
    pm = plugtron_manager_factory(
        env={"PLUGTRON_PLUGINS": "example"},
        plugins=[plugin_namespace(plugtron_register_families), ("named", plugin_namespace(plugtron_register_layer_specs))],
    )
    assert pm.records["gpt"].status == "not selected by PLUGTRON_PLUGINS"
    assert set(pm.tables.families) == {"toy", "fixture-family"}
    assert pm.tables.layer_specs[("fixture-family", "plain")].plugin == "named"


def test_factory_without_entry_points_and_with_a_module_name(plugtron_manager_factory):
    pm = plugtron_manager_factory(load_entrypoints=False, plugins=["plugtron_example.plugin"])
    assert list(pm.records) == ["plugtron", "plugtron_example.plugin"]
    assert pm.family("toy").plugin == "plugtron_example.plugin"
    assert pm.family("toy").distribution is None


def test_factory_gives_independent_managers(plugtron_manager_factory):
    first = plugtron_manager_factory(load_entrypoints=False, plugins=[plugin_namespace(plugtron_register_families)])
    second = plugtron_manager_factory(load_entrypoints=False)
    assert "fixture-family" in first.tables.families
    assert second.tables.families == {}


def test_plugin_namespaces_compare_by_identity(plugtron_manager):
    one, two = plugin_namespace(plugtron_register_families), plugin_namespace(plugtron_register_families)
    assert isinstance(one, PluginNamespace) and one != two
    renamed = plugin_namespace(plugtron_pre_wrap=lambda model, config, context: None)
    assert callable(renamed.plugtron_pre_wrap)
    assert one == one and len({one, two}) == 2
    # pluggy refuses a plugin *equal* to a registered one; these are two plugins
    plugtron_manager.register(one, name="one")
    plugtron_manager.register(two, name="two")
    assert plugtron_manager.pm.get_plugin("two") is two
    with pytest.raises(TypeError, match="takes hook functions"):
        plugin_namespace("plugtron_register_families")


def test_testing_module_is_a_light_pytest_plugin():
    code = (
        "import sys, plugtron.testing as t\n"
        "print(sorted(m for m in ('torch', 'megatron', 'plugtron.manager') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout
    # importing the package imports its (light) manager, but never torch or megatron
    assert out.strip() == "['plugtron.manager']"


def test_fixtures_are_available_without_a_conftest(tmp_path):
    (tmp_path / "test_plugin_author.py").write_text(
        "def test_uses_fixtures(plugtron_manager, plugtron_manager_factory, register_plugin):\n"
        "    assert list(plugtron_manager.records) == ['plugtron']\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout


def test_single_rank_fixture_gives_megatron_a_one_rank_world(plugtron_single_rank):
    import torch.distributed as dist
    from megatron.core import parallel_state

    assert dist.get_world_size() == 1 and plugtron_single_rank.world_size == 1
    assert (plugtron_single_rank.tp, plugtron_single_rank.pp) == (1, 1)
    assert parallel_state.model_parallel_is_initialized()
    assert parallel_state.get_tensor_model_parallel_world_size() == 1
