"""``plugtron plugins``: what it lists, and that it never imports torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


from plugtron.cli import main

PLUGTRON_SCRIPT = Path(sys.executable).with_name("plugtron")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLUGTRON_")}
    env.update(extra)
    return env


def _plugins_json(*args: str, **env: str) -> tuple[dict, subprocess.CompletedProcess]:
    proc = subprocess.run(
        [sys.executable, "-m", "plugtron.cli", *args, "plugins", "--json"],
        capture_output=True, text=True, env=_env(**env), timeout=120,
    )
    return json.loads(proc.stdout), proc


def test_plugins_json_lists_installed_plugins_with_what_they_provide():
    data, proc = _plugins_json()
    assert proc.returncode == 0, proc.stderr
    assert data["error"] is None
    rows = {row["name"]: row for row in data["plugins"]}
    assert rows["plugtron"]["source"] == "builtin"
    assert rows["plugtron"]["hooks"] == ["plugtron_create_builder"]

    gpt = rows["gpt"]
    assert (gpt["distribution"], gpt["version"], gpt["source"], gpt["status"], gpt["error"]) == (
        "plugtron-gpt", "0.1.0", "entry point", "loaded", None,
    )
    assert gpt["families"] == ["gpt"]
    assert {"plugtron_register_families", "plugtron_register_layer_specs"} <= set(gpt["hooks"])
    assert {"te", "torch", "local"} <= {s["name"] for s in gpt["layer_specs"]}
    assert all(s["family"] == "gpt" and isinstance(s["priority"], int) for s in gpt["layer_specs"])
    assert "plugtron_register_converters" in gpt["hooks"]  # the family registers its own HF architectures
    assert {"hf:LlamaForCausalLM->gpt", "hf:GPT2LMHeadModel->gpt"} <= set(gpt["converters"])

    example = rows["example"]
    assert (example["distribution"], example["version"], example["status"]) == ("plugtron-example-plugin", "0.1.0", "loaded")
    assert example["families"] == ["toy"]
    assert example["layer_specs"] == [{"family": "toy", "name": "local", "priority": 100}]
    assert example["hooks"] == ["plugtron_post_wrap", "plugtron_register_converters", "plugtron_register_families",
                                "plugtron_register_layer_specs"]
    assert example["converters"] == ["hf:SeedOssForCausalLM->gpt"]  # a third-party HF architecture for the gpt family


def test_plugins_json_check_adds_availability():
    proc = subprocess.run(
        [sys.executable, "-m", "plugtron.cli", "plugins", "--json", "--check"],
        capture_output=True, text=True, env=_env(PLUGTRON_PLUGINS="example"), timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {row["name"]: row for row in json.loads(proc.stdout)["plugins"]}
    assert rows["example"]["layer_specs"] == [
        {"family": "toy", "name": "local", "priority": 100, "available": True,
         "reason": "megatron-core modules only, runs on CPU and GPU"},
    ]
    assert rows["gpt"]["status"] == "not selected by PLUGTRON_PLUGINS"


def test_console_script_lists_the_same_plugins():
    assert PLUGTRON_SCRIPT.exists()
    proc = subprocess.run([str(PLUGTRON_SCRIPT), "plugins", "--json"], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    names = {row["name"] for row in json.loads(proc.stdout)["plugins"]}
    assert {"plugtron", "gpt", "example"} <= names


def test_plugins_does_not_import_torch_or_megatron():
    code = (
        "import sys\n"
        "from plugtron.cli import main\n"
        "rc = main(['plugins', '--json'])\n"
        "print('RESULT', rc, 'torch' in sys.modules, any(m.startswith('megatron') for m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last == "RESULT 0 False False"
    # and the plugins really were loaded, not skipped
    assert '"name": "example"' in proc.stdout and '"name": "gpt"' in proc.stdout


def test_plugins_lists_a_broken_plugin_as_failed_and_still_succeeds(fake_distribution):
    fake = fake_distribution("raise ImportError('needs libfoo')\n", entry_point="broken", distribution="plugtron-broken")
    data, proc = _plugins_json(PYTHONPATH=str(fake.root))
    assert proc.returncode == 0
    rows = {row["name"]: row for row in data["plugins"]}
    assert (rows["broken"]["status"], rows["broken"]["error"], rows["broken"]["distribution"]) == (
        "failed", "ImportError: needs libfoo", "plugtron-broken",
    )
    assert "plugtron plugin 'broken' from plugtron-broken 0.0.1 failed to load" in proc.stderr
    assert rows["gpt"]["status"] == "loaded"


def test_plugins_reports_duplicate_families_with_exit_status_1(fake_distribution):
    fake = fake_distribution(
        """
        from plugtron import FamilyInfo, hookimpl

        @hookimpl
        def plugtron_register_families():
            return [FamilyInfo("gpt", "x.config:C", "x.builder:B")]
        """,
        entry_point="imposter",
        distribution="plugtron-imposter",
    )
    data, proc = _plugins_json(PYTHONPATH=str(fake.root))
    assert proc.returncode == 1
    assert "model family 'gpt' is claimed twice" in data["error"]
    assert "plugtron-imposter" in data["error"] and "plugtron-gpt" in data["error"]


def test_extra_plugin_module_from_the_command_line(fake_distribution):
    fake = fake_distribution(
        """
        from plugtron import FamilyInfo, hookimpl

        @hookimpl
        def plugtron_register_families():
            return [FamilyInfo("extra", "x.config:C", "x.builder:B")]
        """,
    )
    # -p registers an importable module in-process (here: one whose entry point is disabled)
    data, proc = _plugins_json("-p", fake.module, PYTHONPATH=str(fake.root), PLUGTRON_DISABLE_PLUGINS=fake.entry_point)
    assert proc.returncode == 0, proc.stderr
    rows = {row["name"]: row for row in data["plugins"]}
    assert rows[fake.module]["source"] == "in-process"
    assert rows[fake.module]["families"] == ["extra"]
    assert rows[fake.entry_point]["status"] == "disabled by PLUGTRON_DISABLE_PLUGINS"


def test_human_output_renders_one_block_per_plugin(capsys, monkeypatch):
    import plugtron.manager

    monkeypatch.setattr(plugtron.manager, "_DEFAULT", None)
    monkeypatch.setenv("PLUGTRON_PLUGINS", "example")
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plugtron plugins: 2 of ")
    assert "example  plugtron-example-plugin 0.1.0  loaded\n  families: toy\n  layer specs for toy: local\n" in out
    assert "gpt  plugtron-gpt 0.1.0  not selected by PLUGTRON_PLUGINS" in out


def test_a_command_process_leaves_after_exit_handlers_with_its_output_whole(tmp_path):
    """plugtron.cli.run ends with os._exit (no interpreter teardown): atexit handlers still run, stdout and
    stderr are flushed, and the exit status is the command's, for the console script and ``-m plugtron.cli``."""
    marker = tmp_path / "handler-ran"
    (tmp_path / "leaving_plugin.py").write_text(
        "import atexit, sys\n"
        f"atexit.register(lambda: open({str(marker)!r}, 'w').write('yes'))\n"
        "sys.stderr.write('no newline, still buffered')\n")
    for command in ([sys.executable, "-m", "plugtron.cli"], [str(PLUGTRON_SCRIPT)]):
        marker.unlink(missing_ok=True)
        proc = subprocess.run([*command, "-p", "leaving_plugin", "plugins", "--json"], capture_output=True, text=True,
                              env=_env(PYTHONPATH=str(tmp_path)), timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "leaving_plugin" in {row["name"] for row in json.loads(proc.stdout)["plugins"]}
        assert proc.stderr.endswith("no newline, still buffered")
        assert marker.read_text() == "yes"
    failed = subprocess.run([str(PLUGTRON_SCRIPT), "-p", "no_such_module_here", "plugins"], capture_output=True,
                            text=True, env=_env(), timeout=120)
    assert failed.returncode == 2 and "no_such_module_here" in failed.stderr
