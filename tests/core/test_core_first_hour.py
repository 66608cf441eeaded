"""The first hour of a user and a plugin author: ``plugtron plugins`` on an 80-column terminal,
misspelled hooks, misspelled plugin selections and what the errors tell them to do."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from plugtron.cli.plugins_render import render

BROKEN_WITH_A_LONG_ERROR = (
    "raise ImportError('this plugin needs the shared library libfoo.so.3 from the foo project, "
    "which is not installed here; install foo >= 3.1 and try again')\n"
)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLUGTRON_")}
    env.update(extra)
    return env


def _plugins(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "plugtron.cli", "plugins", *args],
        capture_output=True, text=True, env=_env(**env), timeout=120,
    )


def _names(data: dict) -> set[str]:
    """Every name the listing must show whole: plugins, distributions, families, specs, converters, hooks."""
    names: set[str] = set()
    for row in data["plugins"]:
        names |= {row["name"], *row["families"], *row["converters"], *row["hooks"]}
        names |= {row["distribution"]} if row["distribution"] else set()
        names |= {spec["name"] for spec in row["layer_specs"]} | {spec["family"] for spec in row["layer_specs"]}
    return names


def _tokens(text: str) -> set[str]:
    return {token.rstrip(":") for token in re.split(r"[\s,]+", text) if token}


# -- 1. plugtron plugins fits a terminal --------------------------------------


@pytest.mark.parametrize("width", [80, 120])
@pytest.mark.parametrize("check", [False, True])
def test_listing_fits_the_width_and_never_breaks_a_name(fake_distribution, width, check):
    fake = fake_distribution(BROKEN_WITH_A_LONG_ERROR, entry_point="broken", distribution="plugtron-broken")
    flags = ("--check",) if check else ()
    data = json.loads(_plugins("--json", *flags, PYTHONPATH=str(fake.root)).stdout)
    assert {row["name"] for row in data["plugins"]} >= {"plugtron", "gpt", "mamba", "hf_bridge", "example", "broken"}

    text = render(data, width)
    lines = text.splitlines()
    too_long = [line for line in lines if len(line) > width]
    assert not too_long, too_long
    seen = set().union(*(_tokens(line) for line in lines))
    assert not _names(data) - seen, f"names broken across lines: {_names(data) - seen}"
    # the broken plugin's error is shown, as words
    assert "libfoo.so.3" in seen and "ImportError" in seen


def test_listing_reads_the_width_from_columns_and_keeps_sections_apart():
    proc = _plugins(COLUMNS="80")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert max(map(len, lines)) <= 80

    def block_of(name: str) -> list[str]:
        block = lines[lines.index(next(line for line in lines if line.startswith(f"{name} "))):]
        return block[: block.index("")]

    engine = block_of("hf_bridge")  # the conversion engine registers no architecture, only its commands
    assert engine[0].split() == ["hf_bridge", "plugtron-hf-bridge", "0.1.0", "loaded"]
    assert [line.split(":")[0].strip() for line in engine[1:] if not line.startswith("    ")] == ["hooks"]
    gpt = block_of("gpt")  # the family registers its own HF architectures
    assert gpt[0].split() == ["gpt", "plugtron-gpt", "0.1.0", "loaded"]
    # converters have their own label; the families label is not abused for them
    assert any(line.startswith("  converters: hf:LlamaForCausalLM->gpt") for line in gpt)
    assert [line for line in gpt if line.startswith("  families")] == ["  families: gpt"]
    labels = [line.split(":")[0].strip() for line in gpt[1:] if not line.startswith("    ")]
    assert labels == ["families", "layer specs for gpt", "converters", "hooks"]
    assert any(line.startswith("  layer specs for gpt: te, te_full, torch, local") for line in lines)


def test_listing_does_not_break_names_in_a_narrow_terminal():
    data = json.loads(_plugins("--json").stdout)
    lines = render(data, 40).splitlines()
    assert not _names(data) - set().union(*(_tokens(line) for line in lines))


def _normalised(text: str) -> str:
    """Wrapped output joined back into one line of words."""
    return " ".join(text.split())


# -- 4. a misspelled hook in an installed plugin -------------------------------

MISSPELLED_HOOK = """
from plugtron import hookimpl

@hookimpl
def plugtron_prewrap(model, config, context):
    return None
"""
TYPO_MESSAGE = (
    "plugin 'typo' (plugtron-typo) defines 'plugtron_prewrap', which matches no plugtron hook; "
    "did you mean 'plugtron_pre_wrap'?"
)


def test_misspelled_hook_fails_the_plugin_with_a_suggestion(fake_distribution, plugtron_manager_factory):
    from plugtron.manager import PluginLoadWarning

    fake_distribution(MISSPELLED_HOOK, entry_point="typo", distribution="plugtron-typo")
    with pytest.warns(PluginLoadWarning, match=re.escape(TYPO_MESSAGE)):
        pm = plugtron_manager_factory(env={"PLUGTRON_PLUGINS": "typo"})
    assert (pm.records["typo"].status, pm.records["typo"].error) == ("failed", TYPO_MESSAGE)
    assert not pm.pm.has_plugin("typo")


def test_misspelled_hook_is_an_error_under_strict(fake_distribution, plugtron_manager_factory):
    from plugtron import PluginError

    fake_distribution(MISSPELLED_HOOK, entry_point="typo", distribution="plugtron-typo")
    with pytest.raises(PluginError, match=re.escape(TYPO_MESSAGE)):
        plugtron_manager_factory(env={"PLUGTRON_STRICT": "1"})


def test_misspelled_hook_shows_as_failed_in_the_listing(fake_distribution):
    fake = fake_distribution(MISSPELLED_HOOK, entry_point="typo", distribution="plugtron-typo")
    proc = _plugins(PYTHONPATH=str(fake.root), PLUGTRON_PLUGINS="typo", COLUMNS="80")
    assert proc.returncode == 0, proc.stderr
    block = proc.stdout.split("typo  plugtron-typo 0.0.1  failed\n", 1)[1].split("\n\n")[0]
    assert _normalised(block) == f"error: {TYPO_MESSAGE}"
    assert "did you mean 'plugtron_pre_wrap'?" in proc.stderr  # the warning, once per process


# -- 5. misspelled names in PLUGTRON_PLUGINS / PLUGTRON_DISABLE_PLUGINS ------------


def test_unknown_selected_name_is_a_warning_with_a_suggestion(plugtron_manager_factory):
    from plugtron.manager import PluginSelectionWarning

    with pytest.warns(PluginSelectionWarning, match=re.escape("PLUGTRON_PLUGINS names 'gtp', which is no installed plugin (did you mean 'gpt'?); installed: ")):
        pm = plugtron_manager_factory(env={"PLUGTRON_PLUGINS": "gtp"})
    assert len(pm.warnings) == 1 and "'gtp'" in pm.warnings[0]
    pm.load_entrypoints()  # loading again does not repeat it
    assert len(pm.warnings) == 1


def test_unknown_disabled_name_is_a_warning_and_known_names_are_not(plugtron_manager_factory):
    from plugtron.manager import PluginSelectionWarning

    with pytest.warns(PluginSelectionWarning) as caught:
        pm = plugtron_manager_factory(env={"PLUGTRON_DISABLE_PLUGINS": "plugtron-gpt,exampel", "PLUGTRON_PLUGINS": "gpt,example"})
    assert [str(w.message).split(";")[0] for w in caught] == [
        "PLUGTRON_DISABLE_PLUGINS names 'exampel', which is no installed plugin (did you mean 'example'?)"
    ]
    assert pm.records["example"].status == "loaded"


def test_unknown_selected_name_is_an_error_under_strict(plugtron_manager_factory):
    from plugtron import PluginError

    with pytest.raises(PluginError, match="PLUGTRON_PLUGINS names 'gtp'.*did you mean 'gpt'"):
        plugtron_manager_factory(env={"PLUGTRON_PLUGINS": "gtp", "PLUGTRON_STRICT": "1"})


def test_unknown_selected_name_is_in_the_listing_and_its_json():
    data = json.loads(_plugins("--json", PLUGTRON_PLUGINS="gtp").stdout)
    assert data["error"] is None
    assert [w.split(";")[0] for w in data["warnings"]] == ["PLUGTRON_PLUGINS names 'gtp', which is no installed plugin (did you mean 'gpt'?)"]
    proc = _plugins(PLUGTRON_PLUGINS="gtp", COLUMNS="80")
    assert "warning: PLUGTRON_PLUGINS names 'gtp'" in proc.stdout
    assert "did you mean 'gpt'?" in _normalised(proc.stdout) and "did you mean 'gpt'?" in proc.stderr


@pytest.mark.parametrize(("env", "why"), [
    ({"PLUGTRON_PLUGINS": "example"}, "which PLUGTRON_PLUGINS leaves out (add it to PLUGTRON_PLUGINS to load it)"),
    ({"PLUGTRON_DISABLE_PLUGINS": "gpt"}, "which PLUGTRON_DISABLE_PLUGINS disables (remove it from PLUGTRON_DISABLE_PLUGINS to load it)"),
])
def test_family_of_a_deselected_plugin_says_which_variable_left_it_out(plugtron_manager_factory, env, why):
    from plugtron import UnknownFamilyError

    pm = plugtron_manager_factory(env=env)
    with pytest.raises(UnknownFamilyError, match=re.escape(f"model family 'gpt' is provided by plugin 'gpt' (plugtron-gpt), {why}; loaded families: ")):
        pm.family("gpt")


def test_family_of_a_failed_plugin_gives_its_error(fake_distribution, plugtron_manager_factory):
    from plugtron import UnknownFamilyError

    fake_distribution("raise ImportError('needs libfoo')\n", entry_point="foo", distribution="plugtron-foo")
    with pytest.warns(UserWarning):
        pm = plugtron_manager_factory(env={"PLUGTRON_PLUGINS": "foo"})
    with pytest.raises(UnknownFamilyError, match=re.escape(
        "model family 'foo' is provided by plugin 'foo' (plugtron-foo), which failed to load: ImportError: needs libfoo"
    )):
        pm.family("foo")
    with pytest.raises(UnknownFamilyError, match=re.escape("install its plugin, e.g. pip install plugtron-bar")):
        pm.family("bar")


# -- 6. a family without layer specs ------------------------------------------------


def test_family_without_layer_specs_says_what_to_register(register_plugin):
    from plugtron import FamilyInfo, LayerSpecError, hookimpl
    from plugtron.layer_specs import select_layer_spec

    @hookimpl
    def plugtron_register_families():
        return [FamilyInfo("bare", "pkg.config:Config", "pkg.builder:Builder")]

    pm = register_plugin(plugtron_register_families, name="bare-plugin")
    with pytest.raises(LayerSpecError) as info:
        select_layer_spec(pm, "bare")
    assert str(info.value) == (
        "no layer specs are registered for family 'bare' (provided by plugin 'bare-plugin'); register one from the hook "
        "plugtron_register_layer_specs(), which returns a list of LayerSpecInfo(family='bare', name='local', "
        "factory='pkg.specs:make_spec', check='pkg.specs:available', priority=0, description='', cpu_capable=False); "
        "make_spec(config) returns the layer spec, available() an Availability (see plugtron.hookspecs)"
    )
