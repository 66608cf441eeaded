"""Registration rules: duplicates, misspelled hooks, hook order, chained wraps, builder choice."""

from __future__ import annotations

import re
import types

import pytest

from plugtron import (
    ConverterInfo,
    DuplicateRegistrationError,
    FamilyInfo,
    LayerSpecInfo,
    PluginError,
    UnknownFamilyError,
    hookimpl,
)
from plugtron.manager import _SPEC_NAMES, PluginLoadWarning
from plugtron.testing import plugin_namespace

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch, imported by the toy builder


def _families(*names: str):
    @hookimpl
    def plugtron_register_families():
        return [FamilyInfo(name, f"pkg_{name}.config:Config", f"pkg_{name}.builder:Builder") for name in names]

    return plugin_namespace(plugtron_register_families)


def _converter(architecture: str, family: str):
    @hookimpl
    def plugtron_register_converters():
        return [ConverterInfo("hf", architecture, family, f"pkg_{family}.convert:Adapter")]

    return plugin_namespace(plugtron_register_converters)


# -- duplicates --------------------------------------------------------------


def test_two_plugins_claiming_one_family_is_an_error_naming_both(plugtron_manager):
    plugtron_manager.register(_families("x"), name="first", distribution="dist-one")
    plugtron_manager.register(_families("x", "y"), name="second", distribution="dist-two")
    with pytest.raises(DuplicateRegistrationError) as info:
        plugtron_manager.tables
    message = str(info.value)
    assert message.startswith("model family 'x' is claimed twice: by plugin '")
    assert "plugin 'first' (distribution dist-one)" in message
    assert "plugin 'second' (distribution dist-two)" in message
    assert message.endswith("uninstall one, or disable it with PLUGTRON_DISABLE_PLUGINS")
    assert isinstance(info.value, PluginError)


def test_duplicate_of_an_installed_family_names_the_installed_distribution(plugtron_manager_factory):
    pm = plugtron_manager_factory(plugins=[("my-toy", _families("toy"))])
    with pytest.raises(DuplicateRegistrationError, match=re.escape("plugin 'example' (distribution plugtron-example-plugin)")) as info:
        pm.family("toy")
    assert "plugin 'my-toy' (distribution in-process)" in str(info.value)


def test_two_plugins_claiming_one_converter_is_an_error_naming_both(plugtron_manager):
    plugtron_manager.register(_converter("LlamaForCausalLM", "gpt"), name="conv-a", distribution="dist-a")
    plugtron_manager.register(_converter("LlamaForCausalLM", "toy"), name="conv-b", distribution="dist-b")
    with pytest.raises(DuplicateRegistrationError, match=re.escape("converter ('hf', 'LlamaForCausalLM') is claimed twice")) as info:
        plugtron_manager.tables
    assert "plugin 'conv-a' (distribution dist-a)" in str(info.value)
    assert "plugin 'conv-b' (distribution dist-b)" in str(info.value)


def test_two_plugins_offering_the_same_layer_spec_is_an_error(plugtron_manager):
    def specs():
        return [LayerSpecInfo("gpt", "fast", "m:f", "m:c")]

    plugtron_manager.register(plugin_namespace(plugtron_register_layer_specs=specs), name="spec-a")
    plugtron_manager.register(plugin_namespace(plugtron_register_layer_specs=specs), name="spec-b")
    with pytest.raises(DuplicateRegistrationError, match=re.escape("layer spec ('gpt', 'fast') is claimed twice")):
        plugtron_manager.tables


def test_distinct_converters_and_their_lookup(plugtron_manager):
    plugtron_manager.register(_converter("LlamaForCausalLM", "gpt"), name="conv", distribution="dist-c")
    found = plugtron_manager.converter("hf", "LlamaForCausalLM")
    assert (found.family, found.plugin, found.distribution) == ("gpt", "conv", "dist-c")
    with pytest.raises(Exception, match=re.escape("no converter for hf architecture 'Qwen2ForCausalLM' (known: LlamaForCausalLM)")):
        plugtron_manager.converter("hf", "Qwen2ForCausalLM")


def test_unknown_family_lists_what_is_installed(plugtron_manager):
    plugtron_manager.register(_families("alpha", "beta"), name="ab")
    with pytest.raises(UnknownFamilyError, match=re.escape(
        "no plugin provides model family 'gamma' (installed families: alpha, beta); install its plugin, e.g. pip install plugtron-gamma"
    )):
        plugtron_manager.family("gamma")


# -- misspelled and unknown hooks --------------------------------------------


def test_misspelled_hook_name_is_rejected_naming_plugin_and_name(plugtron_manager):
    @hookimpl
    def plugtron_register_familes():
        return []

    with pytest.raises(PluginError, match=re.escape(
        "plugin 'typo' (dist-typo) defines 'plugtron_register_familes', which matches no plugtron hook; "
        "did you mean 'plugtron_register_families'?"
    )):
        plugtron_manager.register(plugin_namespace(plugtron_register_familes), name="typo", distribution="dist-typo")
    assert "typo" not in plugtron_manager.records
    assert not plugtron_manager.pm.has_plugin("typo")


def test_hook_name_with_no_close_match_lists_the_known_hooks(plugtron_manager):
    known = ", ".join(sorted(_SPEC_NAMES))
    with pytest.raises(PluginError, match=re.escape(f"defines 'plugtron_zzz', which matches no plugtron hook; known hooks: {known}")):
        plugtron_manager.register(plugin_namespace(plugtron_zzz=lambda: None), name="far-off")


def test_misspelled_undecorated_hook_is_rejected_too(plugtron_manager):
    module = types.ModuleType("undecorated_plugin")
    module.plugtron_post_wrapp = lambda model, config, context: None
    with pytest.raises(PluginError, match="plugin 'undecorated_plugin' \\(in-process\\) defines 'plugtron_post_wrapp'"):
        plugtron_manager.register(module)


def test_decorated_impl_with_an_unknown_name_is_rejected(plugtron_manager):
    @hookimpl
    def register_families():
        return []

    with pytest.raises(PluginError, match=r"^plugin 'unknown-hook' \(in-process\): unknown hook 'register_families' in plugin"):
        plugtron_manager.register(plugin_namespace(register_families), name="unknown-hook")
    assert not plugtron_manager.pm.has_plugin("unknown-hook")
    assert "unknown-hook" not in plugtron_manager.records


def test_hook_with_an_unknown_argument_is_rejected(plugtron_manager):
    @hookimpl
    def plugtron_pre_wrap(model, config, context, device):
        return None

    with pytest.raises(PluginError, match=r"(?s)^plugin 'bad-args' \(in-process\): .*hook 'plugtron_pre_wrap'.*Argument\(s\) \{'device'\} are declared in the hookimpl"):
        plugtron_manager.register(plugin_namespace(plugtron_pre_wrap), name="bad-args")
    assert not plugtron_manager.pm.has_plugin("bad-args")


def test_undecorated_functions_matching_a_spec_are_implementations(plugtron_manager):
    class Plugin:
        def plugtron_register_families(self):
            return [FamilyInfo("plain", "a.b:C", "a.b:D")]

        def helper(self):  # not a hook: ignored
            return 1

    plugtron_manager.register(Plugin(), name="plain")
    assert plugtron_manager.records["plain"].hooks == ["plugtron_register_families"]
    assert plugtron_manager.family("plain").plugin == "plain"


def test_registering_the_same_name_twice_is_a_plugin_error(plugtron_manager):
    plugtron_manager.register(_families("one"), name="same")
    with pytest.raises(PluginError, match=r"^plugin 'same' \(in-process\): Plugin name already registered: same"):
        plugtron_manager.register(_families("two"), name="same")
    assert list(plugtron_manager.tables.families) == ["one"]


def test_failed_second_registration_of_one_object_keeps_the_first(plugtron_manager):
    module = types.ModuleType("twice")
    module.plugtron_register_families = hookimpl(lambda: [FamilyInfo("twice", "a.b:C", "a.b:D")])
    plugtron_manager.register(module, name="first-name")
    with pytest.raises(PluginError, match=r"^plugin 'second-name' \(in-process\): Plugin already registered under a different name"):
        plugtron_manager.register(module, name="second-name")
    assert plugtron_manager.pm.has_plugin("first-name")
    assert plugtron_manager.family("twice").plugin == "first-name"


def test_unregister_removes_the_plugin_and_its_records(plugtron_manager):
    plugtron_manager.register(_families("gone"), name="temp")
    assert "gone" in plugtron_manager.tables.families
    plugtron_manager.unregister("temp")
    assert "temp" not in plugtron_manager.records
    assert "gone" not in plugtron_manager.tables.families


# -- order of the chained wrap hooks -------------------------------------------


def _appender(label: str, calls: list, **marks):
    @hookimpl(**marks)
    def plugtron_pre_wrap(model, config, context):
        calls.append(label)
        model.append(label)
        return None

    return plugin_namespace(plugtron_pre_wrap)


def test_pre_wrap_runs_tryfirst_then_plain_then_trylast(plugtron_manager):
    calls: list[str] = []
    # registered in the opposite of the expected order, so the markers must do the work
    plugtron_manager.register(_appender("first", calls, tryfirst=True), name="first")
    plugtron_manager.register(_appender("last", calls, trylast=True), name="last")
    plugtron_manager.register(_appender("plain", calls), name="plain")
    chunks = plugtron_manager.hooks.pre_wrap(["chunk"], config=None, context=None)
    assert calls == ["first", "plain", "last"]
    assert chunks == ["chunk", "first", "plain", "last"]


def test_plain_wrap_hooks_run_most_recently_registered_first(plugtron_manager):
    calls: list[str] = []
    for label in ("a", "b", "c"):
        plugtron_manager.register(_appender(label, calls), name=label)
    plugtron_manager.hooks.pre_wrap([], config=None, context=None)
    assert calls == ["c", "b", "a"]


def test_a_returned_list_replaces_the_chunks_for_the_next_hook(plugtron_manager):
    seen: dict[str, list] = {}

    @hookimpl(tryfirst=True)
    def plugtron_pre_wrap(model, config, context):
        seen["replacer"] = list(model)
        return ["new-0", "new-1"]

    def observer(model, config, context):
        seen["observer"] = list(model)
        return ("tuple", "ok")

    @hookimpl(trylast=True)
    def mutator(model, config, context):
        seen["mutator"] = list(model)
        model.append("mutated")
        return None

    plugtron_manager.register(plugin_namespace(plugtron_pre_wrap), name="replacer")
    plugtron_manager.register(plugin_namespace(plugtron_pre_wrap=mutator), name="mutator")
    plugtron_manager.register(plugin_namespace(plugtron_pre_wrap=observer), name="observer")
    original = ["old"]
    result = plugtron_manager.hooks.pre_wrap(original, config="cfg", context="ctx")
    assert seen == {"replacer": ["old"], "observer": ["new-0", "new-1"], "mutator": ["tuple", "ok"]}
    assert result == ["tuple", "ok", "mutated"]
    assert isinstance(result, list)
    assert original == ["old"]


def test_post_wrap_is_chained_the_same_way(plugtron_manager):
    @hookimpl
    def plugtron_post_wrap(model, config, context):
        return [f"{chunk}+{config}+{context}" for chunk in model]

    plugtron_manager.register(plugin_namespace(plugtron_post_wrap), name="post")
    assert plugtron_manager.hooks.post_wrap(["m"], config="c", context="x") == ["m+c+x"]
    assert plugtron_manager.hooks.pre_wrap(["m"], config="c", context="x") == ["m"]


def test_wrap_hook_returning_something_else_is_blamed(plugtron_manager):
    @hookimpl
    def plugtron_pre_wrap(model, config, context):
        return model[0]

    plugtron_manager.register(plugin_namespace(plugtron_pre_wrap), name="scalar")
    with pytest.raises(TypeError, match=re.escape("wrap hook of plugin 'scalar' returned str; expected a list of chunks or None")):
        plugtron_manager.hooks.pre_wrap(["only"], config=None, context=None)


@pytest.mark.parametrize("hook", ["plugtron_pre_wrap", "plugtron_post_wrap"])
@pytest.mark.parametrize("kind", ["hookwrapper", "wrapper"])
def test_chained_hooks_cannot_be_wrappers(plugtron_manager, hook, kind):
    def wrap(model, config, context):
        result = yield
        return result

    plugin = plugin_namespace(**{hook: hookimpl(**{kind: True})(wrap)})
    with pytest.raises(PluginError, match=re.escape(f"plugin 'wrapping': {hook} is chained and cannot be a wrapper")):
        plugtron_manager.register(plugin, name="wrapping")
    assert not plugtron_manager.pm.has_plugin("wrapping")
    assert "wrapping" not in plugtron_manager.records


def test_entry_point_wrapper_is_reported_as_failed(fake_distribution, plugtron_manager_factory):
    fake_distribution(
        """
        from plugtron import hookimpl

        @hookimpl(hookwrapper=True)
        def plugtron_post_wrap(model, config, context):
            yield
        """,
        entry_point="wrapper",
        distribution="plugtron-wrapper",
    )
    with pytest.warns(PluginLoadWarning, match="plugtron_post_wrap is chained and cannot be a wrapper"):
        pm = plugtron_manager_factory(env={"PLUGTRON_PLUGINS": "wrapper"})
    assert pm.records["wrapper"].status == "failed"
    assert not pm.pm.has_plugin("wrapper")


# -- create_builder --------------------------------------------------------------


class _Config:
    family = "toy"
    num_layers = 2


def test_builtin_creates_the_family_builder_class(plugtron_manager_factory):
    from plugtron_example.builder import ToyBuilder

    pm = plugtron_manager_factory(env={"PLUGTRON_PLUGINS": "example"})
    config = _Config()
    builder = pm.hooks.create_builder(config, pm.family("toy"))
    assert type(builder) is ToyBuilder
    assert builder.config is config


def test_tryfirst_third_party_builder_overrides_the_builtin(plugtron_manager_factory):
    from plugtron_example.builder import ToyBuilder

    class DeepToyBuilder(ToyBuilder):
        pass

    @hookimpl(tryfirst=True)
    def plugtron_create_builder(config, family):
        if family.name == "toy" and config.num_layers > 4:
            return DeepToyBuilder(config)
        return None

    pm = plugtron_manager_factory(env={"PLUGTRON_PLUGINS": "example"}, plugins=[("deep", plugin_namespace(plugtron_create_builder))])
    toy = pm.family("toy")
    shallow, deep = _Config(), _Config()
    deep.num_layers = 8
    assert type(pm.hooks.create_builder(shallow, toy)) is ToyBuilder  # None falls through to the builtin
    built = pm.hooks.create_builder(deep, toy)
    assert type(built) is DeepToyBuilder and built.config is deep


def test_builtin_error_for_a_missing_builder_class_is_an_import_error(plugtron_manager):
    plugtron_manager.register(_families("ghost"), name="ghost")
    with pytest.raises(ModuleNotFoundError, match="pkg_ghost"):
        plugtron_manager.hooks.create_builder(_Config(), plugtron_manager.family("ghost"))
