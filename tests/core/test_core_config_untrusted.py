"""A config file is data from a stranger: it can name allowed callables, never run code.

``plugtron build FILE`` and the ``plugtron_model.json`` of a downloaded
checkpoint go through :func:`plugtron.config.load`. The bait module written by
these tests drops a marker file when it is *imported* and another when its
function is *called*: no refused config may leave either behind.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from plugtron import ConfigError, FamilyInfo, PlugtronPluginManager, hookimpl
from plugtron.config import load, save
from plugtron.records import import_path_of, resolve
from plugtron_example.config import ToyConfig
from plugtron_gpt.config import GPTModelConfig

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:megatron"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

#: The closed core allowlist, spelled out: widening it is a security decision this test must see.
EXPECTED_CORE = (
    "torch.nn.functional:silu", "torch.nn.functional:gelu", "torch._C._nn:gelu", "torch.nn.functional:relu",
    "megatron.core.activations:squared_relu", "megatron.core.activations:quick_gelu",
    "megatron.core.activations:fast_gelu", "megatron.core.fusions.fused_bias_geglu:quick_gelu",
    "megatron.core.transformer.utils:openai_gelu", "megatron.core.transformer.utils:erf_gelu",
    "plugtron.activations:gelu_tanh",
    *(f"torch.nn.init:{n}" for n in ("normal_", "trunc_normal_", "uniform_", "constant_", "zeros_", "ones_",
                                     "xavier_normal_", "xavier_uniform_", "kaiming_normal_", "kaiming_uniform_")),
)
TINY = {"family": "gpt", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "vocab_size": 128}
BAIT = "BAIT"  # replaced by the bait module's name


@pytest.fixture(scope="module")
def pm() -> PlugtronPluginManager:
    return PlugtronPluginManager(env={"PLUGTRON_PLUGINS": "gpt,example"})


@pytest.fixture
def bait(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """(module name, marker dir): importing the module or calling ``write_marker`` leaves a file there."""
    name = f"plugtron_bait_{uuid.uuid4().hex}"
    markers = tmp_path / "markers"
    markers.mkdir()
    (tmp_path / f"{name}.py").write_text(
        "import os\n"
        f"open({str(markers / 'imported')!r}, 'w').close()\n"
        "def write_marker(path=None):\n"
        f"    open(path or {str(markers / 'called')!r}, 'w').close()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, markers
    assert name not in sys.modules, "the bait module was imported"
    assert not list(markers.iterdir()), f"bait ran: {sorted(p.name for p in markers.iterdir())}"


def _file(tmp_path: Path, bait_name: str, **fields: Any) -> Path:
    text = json.dumps({**TINY, **fields}).replace(BAIT, bait_name)
    path = tmp_path / "model.json"
    path.write_text(text)
    return path


def _refused(path: Path, pm: PlugtronPluginManager, field: str, *needles: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(path, pm)
    assert info.value.field == field
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    return info.value


# -- paths ---------------------------------------------------------------------------------

REFUSED_PATHS = [
    "os:system", "subprocess:run", "builtins:eval", "builtins:exec", "torch:load", "torch.hub:load",
    "torch.jit:load", "torch.utils.cpp_extension:load_inline", "torch.hub:os.system", "torch:ops.aten.add",
    "plugtron.config._codec:functools.partial", "plugtron.records:resolve", "torch.nn.functional:silu.__globals__",
    f"{BAIT}:write_marker", f"{BAIT}:os.system", "torch.nn.functional", "",
]


@pytest.mark.parametrize("field", ["activation_func", "init_method"])
@pytest.mark.parametrize("path", REFUSED_PATHS)
def test_a_path_off_the_allowlist_is_refused_before_any_import(tmp_path, pm, bait, field, path):
    named = path.replace(BAIT, bait[0])
    error = _refused(_file(tmp_path, bait[0], **{field: path}), pm, field,
                     f"'{named}' is not a callable", "; allowed: ", "torch.nn.functional:silu")
    assert "FamilyInfo(config_callables=" in str(error)


def test_the_refusal_suggests_the_close_allowed_path(tmp_path, pm, bait):
    _refused(_file(tmp_path, bait[0], activation_func="torch.nn.functional:selu"), pm, "activation_func",
             "did you mean 'torch.nn.functional:silu'?")


@pytest.mark.parametrize("value", [5, ["torch.nn.functional:silu"], True])
def test_a_callable_field_holds_a_path_or_a_partial_only(tmp_path, pm, bait, value):
    _refused(_file(tmp_path, bait[0], activation_func=value), pm, "activation_func", "import path string")


# -- partials ------------------------------------------------------------------------------

REFUSED_PARTIALS = [
    ({"function": "torch.nn.functional:silu", "args": ["rm -rf /"]}, "args[0] is 'rm -rf /'"),
    ({"function": f"{BAIT}:write_marker", "args": ["MARKER"]}, f"'{BAIT}:write_marker' is not a callable"),
    ({"function": "os:system", "args": ["touch MARKER"]}, "'os:system' is not a callable"),
    ({"function": "torch.nn.init:normal_", "kwargs": {"std": "0.02"}}, "kwargs['std'] is '0.02'"),
    ({"function": "torch.nn.init:normal_", "kwargs": {"std": [0.02]}}, "kwargs['std'] is [0.02]"),
    ({"function": "torch.nn.init:normal_", "kwargs": {"mean": {"a": 1}}}, "kwargs['mean'] is {'a': 1}"),
    ({"function": "torch.nn.init:normal_", "kwargs": {"mean": {"function": "os:system", "args": ["id"]}}},
     "kwargs['mean'] is {'function'"),
    ({"function": "torch.nn.functional:gelu", "kwargs": {"approximate": "rm -rf /"}}, "or one of ['none', 'tanh']"),
    ({"function": "torch.nn.init:normal_", "call": "os:system"}, "got keys ['call', 'function']"),
    ({"function": "torch.nn.init:normal_", "args": {"0": 1}}, "'args' must be a list"),
    ({"args": [1]}, "got keys ['args']"),
]


@pytest.mark.parametrize("field", ["init_method", "activation_func"])
@pytest.mark.parametrize(("partial", "says"), REFUSED_PARTIALS)
def test_a_partial_takes_only_allowed_functions_and_scalar_arguments(tmp_path, pm, bait, field, partial, says):
    marker = str(bait[1] / "from-argument")
    partial = json.loads(json.dumps(partial).replace("MARKER", marker))
    _refused(_file(tmp_path, bait[0], **{field: partial}), pm, field, says.replace(BAIT, bait[0]))
    assert not os.path.exists(marker)


def test_yaml_tags_cannot_build_objects(tmp_path, pm, bait):
    path = tmp_path / "model.yaml"
    marker = bait[1] / "from-yaml"
    path.write_text(f"family: gpt\nactivation_func: !!python/object/apply:os.system [\"touch {marker}\"]\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path} is not valid YAML")):
        load(path, pm)


# -- what a file cannot choose -------------------------------------------------------------


@pytest.mark.parametrize("key", ["transformer_config_class", "config_class", "builder_class"])
def test_a_file_cannot_choose_a_class(tmp_path, pm, bait, key):
    path = _file(tmp_path, bait[0], **{key: f"{BAIT}:write_marker"})
    _refused(path, pm, key, "unknown field")


# -- files ---------------------------------------------------------------------------------


def test_an_endless_device_fails_at_once(pm):
    with pytest.raises(ConfigError, match=r"config field 'path': cannot read config file /dev/zero: is not a regular file"):
        load("/dev/zero", pm)


def test_a_huge_file_fails_before_it_is_read(tmp_path, pm):
    from plugtron.config.io import MAX_CONFIG_BYTES

    path = tmp_path / "huge.json"
    with open(path, "wb") as handle:
        handle.truncate(MAX_CONFIG_BYTES + 1)  # sparse: costs no disk
    with pytest.raises(ConfigError, match=re.escape(f"cannot read config file {path}: is {MAX_CONFIG_BYTES + 1:,} bytes")):
        load(path, pm)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path, pm):
    path = tmp_path / "fifo.json"
    os.mkfifo(path)
    old = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("load() blocked on a FIFO"))
    signal.alarm(10)
    try:
        with pytest.raises(ConfigError, match=re.escape(f"cannot read config file {path}: is not a regular file")):
            load(path, pm)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_a_checkpoint_config_linking_outside_is_not_followed(tmp_path, pm):
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps(TINY))
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "plugtron_model.json").symlink_to(secret)
    with pytest.raises(ConfigError, match=re.escape("refusing to follow it")) as info:
        load(checkpoint, pm)
    assert str(checkpoint / "plugtron_model.json") in str(info.value)


def test_duplicate_json_keys_are_refused(tmp_path, pm):
    path = tmp_path / "twice.json"
    path.write_text('{"family": "gpt", "activation_func": "torch.nn.functional:silu", "activation_func": "os:system"}')
    with pytest.raises(ConfigError, match=re.escape(f"{path} is not valid JSON: key 'activation_func' appears twice")):
        load(path, pm)


# -- what loads ----------------------------------------------------------------------------


def test_the_core_allowlist_is_exactly_the_expected_one():
    from plugtron.config import _codec

    assert _codec.CORE_CALLABLES == frozenset(EXPECTED_CORE)


@pytest.mark.parametrize("path", EXPECTED_CORE)
def test_every_allowed_callable_round_trips(tmp_path, pm, path):
    function = resolve(path)
    config = GPTModelConfig(**{k: v for k, v in TINY.items() if k != "family"}, activation_func=function,
                            init_method=functools.partial(torch.nn.init.normal_, mean=0.0, std=0.02))
    again = load(save(config, tmp_path / "model.json"), pm)
    assert again == config
    assert again.activation_func is function
    assert import_path_of(function) in EXPECTED_CORE  # what save writes is allowed too


@pytest.mark.parametrize("partial", [
    functools.partial(torch.nn.functional.gelu, approximate="tanh"),
    functools.partial(torch.nn.init.kaiming_normal_, a=0, mode="fan_out", nonlinearity="relu"),
    functools.partial(torch.nn.init.trunc_normal_, 0.0, 0.02, -2, 2.0),
    functools.partial(torch.nn.init.normal_, mean=0.0, std=0.01, generator=None),
])
def test_partials_with_scalar_arguments_round_trip(tmp_path, pm, partial):
    config = GPTModelConfig(**{k: v for k, v in TINY.items() if k != "family"}, init_method=partial)
    for suffix in (".json", ".yaml"):
        again = load(save(config, tmp_path / f"model{suffix}"), pm)
        assert again == config
        assert (again.init_method.func, again.init_method.args, again.init_method.keywords) == (
            partial.func, partial.args, partial.keywords)


def test_plugtrons_own_tanh_gelu_round_trips(tmp_path, pm):
    from plugtron.activations import gelu_tanh

    config = GPTModelConfig(**{k: v for k, v in TINY.items() if k != "family"}, activation_func=gelu_tanh)
    assert load(save(config, tmp_path / "gpt2.json", pm), pm).activation_func is gelu_tanh


def scaled_identity(x: Any, scale: float = 1.0) -> Any:
    """A stand-in for a plugin's own activation."""
    return x * scale


def test_save_refuses_what_load_would_refuse(tmp_path, pm):
    mine = ToyConfig(num_layers=1, hidden_size=8, num_attention_heads=1, activation_func=scaled_identity)
    with pytest.raises(ConfigError, match=r"'ToyConfig.activation_func': cannot be saved: '.*:scaled_identity' is not"):
        save(mine, tmp_path / "mine.json", pm)
    stringy = ToyConfig(num_layers=1, hidden_size=8, num_attention_heads=1,
                        init_method=functools.partial(torch.nn.init.normal_, std="0.1"))
    refused = "'ToyConfig.init_method': cannot be saved: partial of 'torch.nn.init:normal_'"
    with pytest.raises(ConfigError, match=re.escape(refused)):
        save(stringy, tmp_path / "stringy.json", pm)
    assert not list(tmp_path.iterdir())


# -- plugin-declared callables -------------------------------------------------------------


def _toy_family(*callables: str) -> Any:
    @hookimpl
    def plugtron_register_families() -> list[FamilyInfo]:
        return [FamilyInfo("toy", "plugtron_example.config:ToyConfig", "plugtron_example.builder:ToyBuilder",
                           config_callables=callables)]

    return plugtron_register_families


def test_a_callable_a_plugin_declares_loads_and_round_trips(tmp_path, pm, register_plugin):
    path = import_path_of(scaled_identity)
    declared = register_plugin(_toy_family(path), name="declares")
    config = ToyConfig(num_layers=1, hidden_size=8, num_attention_heads=1, activation_func=scaled_identity,
                       init_method=functools.partial(scaled_identity, scale=0.5))
    saved = save(config, tmp_path / "toy.json", declared)
    assert json.loads(saved.read_text())["activation_func"] == path
    again = load(saved, declared)
    assert again == config and again.activation_func is scaled_identity
    assert again.init_method.keywords == {"scale": 0.5}
    # the same file under a manager whose families do not declare it
    _refused(saved, pm, "activation_func", f"'{path}' is not a callable a config file may name")


@pytest.mark.parametrize(("declared", "error"), [
    ("pkg.acts:my_act", "not the string"),
    (("torch.hub:os.system",), "no attribute walk"),
    (("my_act",), "must look like 'package.module:function'"),
    ((3,), "must look like"),
])
def test_declarations_are_exact_module_function_paths(declared, error):
    with pytest.raises((TypeError, ValueError), match=re.escape(error)):
        FamilyInfo("toy", "a.b:C", "a.b:D", config_callables=declared)
