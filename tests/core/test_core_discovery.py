"""Entry-point discovery: real installed plugins, broken ones, and env selection."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

from plugtron import FamilyInfo, PluginError, hookimpl
from plugtron.manager import PluginLoadWarning, PlugtronPluginManager

# -- the real installed plugins ------------------------------------------------


def test_example_plugin_is_found_through_its_installed_entry_point(plugtron_manager_factory):
    pm = plugtron_manager_factory()
    record = pm.records["example"]
    assert (record.distribution, record.version, record.source, record.status) == (
        "plugtron-example-plugin", "0.1.0", "entry point", "loaded",
    )
    assert record.hooks == ["plugtron_post_wrap", "plugtron_register_converters", "plugtron_register_families",
                            "plugtron_register_layer_specs"]
    toy = pm.family("toy")
    assert (toy.plugin, toy.distribution) == ("example", "plugtron-example-plugin")
    assert toy.config_class == "plugtron_example.config:ToyConfig"
    assert toy.builder_class == "plugtron_example.builder:ToyBuilder"
    [spec] = pm.layer_specs("toy")
    assert (spec.name, spec.plugin, spec.distribution) == ("local", "example", "plugtron-example-plugin")
    assert spec.availability().ok


def test_gpt_plugin_is_found_through_its_installed_entry_point(plugtron_manager_factory):
    pm = plugtron_manager_factory()
    record = pm.records["gpt"]
    assert (record.distribution, record.source, record.status) == ("plugtron-gpt", "entry point", "loaded")
    gpt = pm.family("gpt")
    assert (gpt.plugin, gpt.distribution) == ("gpt", "plugtron-gpt")
    specs = pm.layer_specs("gpt")
    assert {"te", "torch", "local"} <= {s.name for s in specs}
    assert [s.priority for s in specs] == sorted((s.priority for s in specs), reverse=True)  # best first
    assert {(s.plugin, s.distribution) for s in specs} == {("gpt", "plugtron-gpt")}


def test_builtin_plugin_is_always_registered_first(plugtron_manager_factory):
    pm = plugtron_manager_factory()
    first = next(iter(pm.records.values()))
    assert (first.name, first.source, first.hooks) == ("plugtron", "builtin", ["plugtron_create_builder"])


def test_loading_entry_points_twice_keeps_one_record_per_plugin(plugtron_manager_factory):
    pm = plugtron_manager_factory()
    before = dict(pm.records)
    pm.load_entrypoints()
    assert pm.records == before
    assert pm.family("toy").plugin == "example"


# -- broken plugins ------------------------------------------------------------

RAISES_AT_IMPORT = """
raise RuntimeError("this plugin is broken on purpose")
"""


def test_plugin_that_fails_to_import_is_reported_and_skipped(fake_distribution, plugtron_manager_factory):
    fake = fake_distribution(RAISES_AT_IMPORT, entry_point="broken", distribution="plugtron-broken")
    with pytest.warns(PluginLoadWarning, match=r"plugtron plugin 'broken' from plugtron-broken 0\.0\.1 failed to load: "
                                               r"RuntimeError: this plugin is broken on purpose \(skipped; PLUGTRON_STRICT=1"):
        pm = plugtron_manager_factory()
    record = pm.records["broken"]
    assert (record.status, record.distribution, record.version, record.source) == (
        "failed", "plugtron-broken", "0.0.1", "entry point",
    )
    assert record.error == "RuntimeError: this plugin is broken on purpose"
    assert fake.module not in sys.modules
    # the host keeps working with the other plugins
    assert pm.family("gpt").distribution == "plugtron-gpt"
    assert pm.family("toy").distribution == "plugtron-example-plugin"


def test_plugin_calling_sys_exit_at_import_does_not_exit_the_host(fake_distribution, plugtron_manager_factory):
    fake_distribution("import sys\nsys.exit(3)\n", entry_point="exiter", distribution="plugtron-exiter")
    with pytest.warns(PluginLoadWarning, match="plugtron plugin 'exiter' from plugtron-exiter"):
        pm = plugtron_manager_factory(env={"PLUGTRON_PLUGINS": "exiter"})
    assert pm.records["exiter"].status == "failed"
    assert pm.records["exiter"].error == "SystemExit: 3"


def test_strict_mode_turns_an_import_failure_into_a_plugin_error(fake_distribution, plugtron_manager_factory):
    fake_distribution(RAISES_AT_IMPORT, entry_point="broken", distribution="plugtron-broken")
    with pytest.raises(PluginError, match=r"plugtron plugin 'broken' from plugtron-broken 0\.0\.1 failed to load: "
                                          r"RuntimeError: this plugin is broken on purpose$") as info:
        plugtron_manager_factory(env={"PLUGTRON_STRICT": "1"})
    assert isinstance(info.value.__cause__, RuntimeError)


@pytest.mark.parametrize("value", ["true", "yes", " ON "])
def test_strict_mode_accepts_the_usual_spellings(fake_distribution, plugtron_manager_factory, value):
    fake_distribution(RAISES_AT_IMPORT, entry_point="broken", distribution="plugtron-broken")
    with pytest.raises(PluginError, match="plugtron plugin 'broken' from plugtron-broken"):
        plugtron_manager_factory(env={"PLUGTRON_STRICT": value, "PLUGTRON_PLUGINS": "broken"})


def test_entry_point_plugin_with_a_misspelled_hook_is_skipped_not_fatal(fake_distribution, plugtron_manager_factory):
    fake_distribution(
        """
        from plugtron import hookimpl

        @hookimpl
        def plugtron_register_familes():
            return []
        """,
        entry_point="typo",
        distribution="plugtron-typo",
    )
    with pytest.warns(PluginLoadWarning, match="plugtron plugin 'typo' from plugtron-typo 0.0.1 failed to load"):
        pm = plugtron_manager_factory()
    record = pm.records["typo"]
    assert record.status == "failed"
    assert "defines 'plugtron_register_familes', which matches no plugtron hook" in record.error
    assert not pm.pm.has_plugin("typo")
    assert "gpt" in pm.tables.families


FAILS_WHEN_CALLED = """
from plugtron import FamilyInfo, LayerSpecInfo, hookimpl

@hookimpl
def plugtron_register_families():
    raise ValueError("cannot list my families")

@hookimpl
def plugtron_register_layer_specs():
    return [LayerSpecInfo("gpt", "never", "x.y:spec", "x.y:check")]
"""


def test_plugin_whose_registration_hook_raises_is_dropped(fake_distribution, plugtron_manager_factory):
    fake = fake_distribution(FAILS_WHEN_CALLED, entry_point="flaky", distribution="plugtron-flaky")
    pm = plugtron_manager_factory()
    assert pm.records["flaky"].status == "loaded"  # importing it was fine
    with pytest.warns(PluginLoadWarning, match=r"plugtron plugin 'flaky' from plugtron-flaky 0\.0\.1 failed to load: "
                                               r"ValueError: cannot list my families"):
        families = pm.tables.families
    record = pm.records["flaky"]
    assert (record.status, record.error) == ("failed", "ValueError: cannot list my families")
    assert not pm.pm.has_plugin("flaky")
    assert fake.module in sys.modules
    # nothing it offered survives, and everyone else is still there
    assert "never" not in [s.name for s in pm.layer_specs("gpt")]
    assert {"gpt", "toy"} <= set(families)


def test_registration_hook_failure_is_fatal_in_strict_mode(fake_distribution, plugtron_manager_factory):
    fake_distribution(FAILS_WHEN_CALLED, entry_point="flaky", distribution="plugtron-flaky")
    pm = plugtron_manager_factory(env={"PLUGTRON_STRICT": "1"})
    with pytest.raises(PluginError, match=r"plugin 'flaky' from plugtron-flaky failed while registering: ValueError\('cannot list my families'\)"):
        pm.tables


def test_strict_registration_failure_names_the_distribution(fake_distribution, plugtron_manager_factory):
    fake_distribution(FAILS_WHEN_CALLED, entry_point="flaky", distribution="plugtron-flaky")
    pm = plugtron_manager_factory(env={"PLUGTRON_STRICT": "1"})
    with pytest.raises(PluginError, match="plugtron-flaky"):
        pm.tables


LATE_FAILURE = """
from plugtron import FamilyInfo, hookimpl

@hookimpl
def plugtron_register_families():
    return [FamilyInfo("halfway", "x.config:C", "x.builder:B")]

@hookimpl
def plugtron_register_layer_specs():
    raise ValueError("specs are broken")
"""


def test_plugin_dropped_in_a_later_registration_hook_loses_its_earlier_records(fake_distribution, plugtron_manager_factory):
    fake_distribution(LATE_FAILURE, entry_point="halfway", distribution="plugtron-halfway")
    pm = plugtron_manager_factory(env={"PLUGTRON_PLUGINS": "halfway"})
    with pytest.warns(PluginLoadWarning, match="ValueError: specs are broken"):
        families = pm.tables.families
    assert pm.records["halfway"].status == "failed"
    assert "halfway" not in families


def test_in_process_plugin_whose_registration_hook_raises_is_an_error(plugtron_manager_factory):
    @hookimpl
    def plugtron_register_families():
        raise KeyError("oops")

    pm = plugtron_manager_factory(load_entrypoints=False)
    pm.register(type("P", (), {"plugtron_register_families": staticmethod(plugtron_register_families)})(), name="local-bug")
    with pytest.raises(PluginError, match=r"plugin 'local-bug' from in-process failed while registering: KeyError\('oops'\)"):
        pm.tables


def test_registration_hook_returning_the_wrong_type_is_blamed(register_plugin):
    @hookimpl
    def plugtron_register_families():
        return ["gpt"]

    pm = register_plugin(plugtron_register_families, name="wrong-type")
    with pytest.raises(PluginError, match=r"plugin 'wrong-type' from in-process failed while registering: .*must return FamilyInfo records, got 'gpt'"):
        pm.tables


def test_registration_hook_may_return_a_single_record_or_none(register_plugin):
    @hookimpl
    def plugtron_register_families():
        return FamilyInfo("single", "a.b:C", "a.b:D")

    @hookimpl
    def plugtron_register_layer_specs():
        return None

    pm = register_plugin(plugtron_register_families, plugtron_register_layer_specs, name="single")
    assert list(pm.tables.families) == ["single"]
    assert pm.tables.layer_specs == {}


# -- PLUGTRON_PLUGINS / PLUGTRON_DISABLE_PLUGINS -----------------------------

RECORDS_IMPORT = """
import sys
sys.modules[__name__].imported = True
raise AssertionError("a disabled plugin must never be imported")
"""


def test_disabled_plugin_is_never_imported(fake_distribution, plugtron_manager_factory):
    fake = fake_distribution(RECORDS_IMPORT, entry_point="forbidden", distribution="plugtron-forbidden")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no PluginLoadWarning either: it was not even tried
        pm = plugtron_manager_factory(env={"PLUGTRON_DISABLE_PLUGINS": "forbidden"})
    record = pm.records["forbidden"]
    assert record.status == "disabled by PLUGTRON_DISABLE_PLUGINS"
    assert (record.distribution, record.version, record.hooks, record.error) == ("plugtron-forbidden", "0.0.1", [], None)
    assert fake.module not in sys.modules
    assert not pm.pm.has_plugin("forbidden")


def test_disable_by_distribution_name_and_in_a_list(fake_distribution, plugtron_manager_factory):
    fake = fake_distribution(RECORDS_IMPORT, entry_point="forbidden", distribution="plugtron-forbidden")
    pm = plugtron_manager_factory(env={"PLUGTRON_DISABLE_PLUGINS": " plugtron-forbidden , example"})
    assert pm.records["forbidden"].status == "disabled by PLUGTRON_DISABLE_PLUGINS"
    assert pm.records["example"].status == "disabled by PLUGTRON_DISABLE_PLUGINS"
    assert fake.module not in sys.modules
    assert "toy" not in pm.tables.families
    assert "gpt" in pm.tables.families


def test_disabling_the_example_plugin_keeps_it_out_of_the_process():
    # a fresh interpreter, because this one has imported plugtron_example already
    code = (
        "import sys; from plugtron import PlugtronPluginManager\n"
        "pm = PlugtronPluginManager(env={'PLUGTRON_DISABLE_PLUGINS': 'example'})\n"
        "print(pm.records['example'].status, '|', 'plugtron_example' in sys.modules, '|', sorted(pm.tables.families))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout
    status, imported, families = (part.strip() for part in out.strip().split("|"))
    assert status == "disabled by PLUGTRON_DISABLE_PLUGINS"
    assert imported == "False"
    assert "toy" not in families and "'gpt'" in families


@pytest.mark.parametrize("selection", ["gpt", "plugtron-gpt"])
def test_plugtron_plugins_selects_only_the_named_plugins(plugtron_manager_factory, fake_distribution, selection):
    fake = fake_distribution(RECORDS_IMPORT, entry_point="other", distribution="plugtron-other")
    pm = plugtron_manager_factory(env={"PLUGTRON_PLUGINS": selection})
    loaded = sorted(name for name, r in pm.records.items() if r.source == "entry point" and r.status == "loaded")
    assert loaded == ["gpt"]
    assert pm.records["example"].status == "not selected by PLUGTRON_PLUGINS"
    assert pm.records["other"].status == "not selected by PLUGTRON_PLUGINS"
    assert fake.module not in sys.modules
    assert list(pm.tables.families) == ["gpt"]


def test_disable_wins_over_select(plugtron_manager_factory):
    pm = plugtron_manager_factory(env={"PLUGTRON_PLUGINS": "gpt,example", "PLUGTRON_DISABLE_PLUGINS": "gpt"})
    assert pm.records["gpt"].status == "disabled by PLUGTRON_DISABLE_PLUGINS"
    assert pm.records["example"].status == "loaded"


def test_manager_reads_the_process_environment_by_default(monkeypatch):
    monkeypatch.setenv("PLUGTRON_PLUGINS", "example")
    monkeypatch.delenv("PLUGTRON_DISABLE_PLUGINS", raising=False)
    monkeypatch.delenv("PLUGTRON_STRICT", raising=False)
    pm = PlugtronPluginManager()
    assert pm.records["gpt"].status == "not selected by PLUGTRON_PLUGINS"
    assert list(pm.tables.families) == ["toy"]
