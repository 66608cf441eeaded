"""Every hook spec documents itself with an example, and the manager knows them all."""

from __future__ import annotations

import inspect

import pytest

from plugtron import hookspecs
from plugtron.manager import _SPEC_NAMES, CHAINED_HOOKS

SPECS = sorted(name for name, obj in vars(hookspecs).items() if name.startswith("plugtron_") and callable(obj))


def test_the_expected_hooks_exist():
    assert {
        "plugtron_create_builder",
        "plugtron_moe_submodules",
        "plugtron_post_wrap",
        "plugtron_pre_wrap",
        "plugtron_register_converters",
        "plugtron_register_families",
        "plugtron_register_layer_specs",
    } <= set(SPECS)
    assert set(SPECS) == _SPEC_NAMES
    assert set(CHAINED_HOOKS) <= set(SPECS)


@pytest.mark.parametrize("name", SPECS)
def test_hook_spec_is_marked_and_documented_with_an_example(name):
    spec = getattr(hookspecs, name)
    assert isinstance(getattr(spec, "plugtron_spec", None), dict), f"{name} is not decorated with @hookspec"
    doc = inspect.getdoc(spec)
    assert doc, f"{name} has no docstring"
    assert "Example" in doc, f"{name}'s docstring has no example"
    assert "::\n" in doc, f"{name}'s docstring has no code block"
    block = doc.split("::\n", 1)[1]
    assert f"def {name}(" in block, f"{name}'s example does not implement the hook"
    assert "@hookimpl" in block


def test_only_create_builder_returns_the_first_result():
    first = {name for name in SPECS if getattr(hookspecs, name).plugtron_spec.get("firstresult")}
    assert first == {"plugtron_create_builder"}


def test_example_arguments_match_the_spec():
    # an implementation copied from a docstring must register cleanly
    for name in SPECS:
        spec = getattr(hookspecs, name)
        params = list(inspect.signature(spec).parameters)
        block = inspect.getdoc(spec).split("::\n", 1)[1]
        assert f"def {name}({', '.join(params)})" in block, name
