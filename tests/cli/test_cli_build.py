"""`plugtron build`: example configs, config errors, and a rank that fails."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from plugtron.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples" / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_config_builds_and_steps(path, capsys):
    assert main(["build", str(path), "--step", "--seq-length", "16"]) == 0
    out = capsys.readouterr().out
    loss = float(out.split("loss", 1)[1].split()[0])
    assert 0.0 < loss < 20.0
    assert "layer spec        torch" in out or "layer spec" in out


def test_meta_build_reports_the_same_parameter_count(capsys):
    default = str(ROOT / "examples" / "configs" / "default.yaml")
    assert main(["build", default]) == 0
    eager = capsys.readouterr().out
    assert main(["build", default, "--meta"]) == 0
    meta = capsys.readouterr().out
    count = lambda text: text.split("params tp=0 pp=0", 1)[1].split()[0]  # noqa: E731
    assert count(eager) == count(meta) == "262,720"


def test_config_error_names_the_field_before_any_launch(capsys):
    default = str(ROOT / "examples" / "configs" / "default.yaml")
    started = time.perf_counter()
    assert main(["build", default, "--tp", "3"]) == 2
    err = capsys.readouterr().err
    assert "num_attention_heads" in err and "tensor_model_parallel_size=3" in err
    assert time.perf_counter() - started < 5


def test_unknown_layer_spec_is_a_clear_error(tmp_path, capsys):
    text = (ROOT / "examples" / "configs" / "default.yaml").read_text().replace("layer_spec: auto", "layer_spec: flash")
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert main(["build", str(path)]) == 2
    assert "no layer spec 'flash'" in capsys.readouterr().err


@pytest.mark.multiprocess
def test_one_failing_rank_ends_every_rank_quickly(tmp_path):
    plugin = tmp_path / "fail_on_rank_one.py"
    plugin.write_text(textwrap.dedent(
        """
        import torch.distributed as dist
        from plugtron import hookimpl

        @hookimpl
        def plugtron_post_wrap(model, config, context):
            if dist.get_rank() == 1:
                raise RuntimeError("injected failure on rank 1")
            dist.barrier()  # rank 0 would wait here forever without the failure handling
        """
    ))
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "plugtron.cli", "-p", "fail_on_rank_one", "build",
         str(ROOT / "examples" / "configs" / "default.yaml"), "--tp", "2"],
        capture_output=True, text=True, env=env, timeout=240,
    )
    elapsed = time.perf_counter() - started
    assert proc.returncode != 0
    assert "[rank 1] plugtron: error: RuntimeError: injected failure on rank 1" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert elapsed < 120, f"took {elapsed:.0f} s"


def test_wrap_hooks_from_the_command_line_run_after_the_plugins(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_hooks.py").write_text(textwrap.dedent(
        """
        CALLS = []

        def freeze(chunks, config, context):
            CALLS.append(("pre", type(chunks[0]).__name__))
            for chunk in chunks:
                chunk.embedding.requires_grad_(False)

        def look(chunks, config, context):
            CALLS.append(("post", all(not p.requires_grad for p in chunks[0].embedding.parameters())))
        """
    ))
    monkeypatch.syspath_prepend(str(tmp_path))
    default = str(ROOT / "examples" / "configs" / "default.yaml")
    assert main(["build", default, "--pre-wrap-hook", "my_hooks:freeze", "--post-wrap-hook", "my_hooks:look"]) == 0
    import my_hooks

    assert my_hooks.CALLS == [("pre", "GPTModel"), ("post", True)]


def test_a_wrap_hook_that_cannot_be_loaded_is_one_line(capsys):
    default = str(ROOT / "examples" / "configs" / "default.yaml")
    assert main(["build", default, "--post-wrap-hook", "no_such_module:hook"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("plugtron: error: --post-wrap-hook no_such_module:hook: cannot load it") and "\n" not in err
