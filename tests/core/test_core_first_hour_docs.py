"""What a newcomer reads and installs: packaging metadata, the pytest plugin's two spellings,
and documentation that is checked against the code so it cannot drift."""

from __future__ import annotations

import importlib.metadata as md
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import attrs
import pytest

ROOT = Path(__file__).resolve().parents[2]
PYPROJECTS = {
    "plugtron": ROOT / "pyproject.toml",
    "plugtron-gpt": ROOT / "plugins/gpt/pyproject.toml",
    "plugtron-mamba": ROOT / "plugins/mamba/pyproject.toml",
    "plugtron-hf-bridge": ROOT / "plugins/hf_bridge/pyproject.toml",
    "plugtron-example-plugin": ROOT / "examples/plugtron-example-plugin/pyproject.toml",
}

# -- 2. the SPDX license string --------------------------------------------------


@pytest.mark.parametrize("distribution", sorted(PYPROJECTS))
def test_every_pyproject_uses_an_spdx_license_string(distribution):
    data = tomllib.loads(PYPROJECTS[distribution].read_text())
    assert data["project"]["license"] == "Apache-2.0"
    [requirement] = [r for r in data["build-system"]["requires"] if r.startswith("setuptools")]
    assert requirement == "setuptools>=77"  # the first setuptools that reads SPDX strings
    assert md.metadata(distribution)["License-Expression"] == "Apache-2.0"  # what pip installed


def test_building_metadata_prints_no_license_warning(tmp_path):
    """setuptools warns about a ``project.license`` table while building metadata; a string is silent."""
    shutil.copy(PYPROJECTS["plugtron"], tmp_path / "pyproject.toml")
    (tmp_path / "README.md").write_text("readme\n")
    (tmp_path / "core/plugtron").mkdir(parents=True)
    (tmp_path / "core/plugtron/__init__.py").write_text("")
    (tmp_path / "out").mkdir()
    code = "import setuptools.build_meta as b, sys; b.prepare_metadata_for_build_wheel(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-W", "default", "-c", code, str(tmp_path / "out")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "license" not in (proc.stdout + proc.stderr).lower()


# -- 7. pytest finds the fixtures however it is asked to -------------------------

AUTHOR_TEST = """
def test_uses_the_fixtures(plugtron_manager, register_plugin):
    assert list(plugtron_manager.records) == ["plugtron"]
"""


@pytest.mark.parametrize(("args", "conftest", "outcome"), [
    ((), None, "1 passed"),
    (("-p", "plugtron.testing"), None, "1 passed"),
    ((), 'pytest_plugins = ["plugtron.testing"]\n', "1 passed"),
    (("-p", "no:plugtron.testing"), None, "fixture 'plugtron_manager' not found"),
], ids=["automatic", "dash-p", "pytest_plugins", "switched-off"])
def test_plugtron_testing_loads_automatically_and_by_name(tmp_path, args, conftest, outcome):
    (tmp_path / "test_author.py").write_text(AUTHOR_TEST)
    if conftest:
        (tmp_path / "conftest.py").write_text(conftest)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert outcome in proc.stdout, proc.stdout + proc.stderr
    assert "already registered" not in proc.stdout + proc.stderr


# -- 8. documentation checked against the code -----------------------------------


def _table_rows(markdown: str) -> list[list[str]]:
    """The cells of every markdown table row below a header separator."""
    rows, in_table = [], False
    for line in markdown.splitlines():
        if re.fullmatch(r"\|(\s*-+\s*\|)+", line.strip()):
            in_table = True
        elif in_table and line.strip().startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        else:
            in_table = False
    return rows


def test_gpt_config_doc_lists_every_field_with_its_default():
    from plugtron_gpt.config import GPTModelConfig

    expected = [[f"`{f.name}`", f"`{f.default!r}`"] for f in attrs.fields(GPTModelConfig)]
    documented = [row[:2] for row in _table_rows((ROOT / "plugins/gpt/CONFIG.md").read_text())]
    assert documented == expected, "plugins/gpt/CONFIG.md must list these rows (field, default):\n" + "\n".join(
        f"| {name} | {default} |" for name, default in expected
    )
    assert all(len(row) == 3 and row[2] for row in _table_rows((ROOT / "plugins/gpt/CONFIG.md").read_text()))


def test_gpt_readme_lists_the_registered_layer_specs(plugtron_manager_factory):
    pm = plugtron_manager_factory(env={"PLUGTRON_PLUGINS": "gpt"})
    registered = [[f"`{s.name}`", str(s.priority)] for s in pm.layer_specs("gpt")]
    documented = [row[:2] for row in _table_rows((ROOT / "plugins/gpt/README.md").read_text())]
    assert documented == registered


def test_readme_links_resolve():
    """Relative links of the main and plugin READMEs; SECURITY.md is written separately."""
    for readme in [ROOT / "README.md", *ROOT.glob("plugins/*/README.md")]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", readme.read_text()):
            path = (readme.parent / target).resolve()
            assert path.exists() or path == ROOT / "SECURITY.md", f"{readme.relative_to(ROOT)} links to missing {target}"


def test_readme_links_what_an_author_looks_for():
    text = (ROOT / "README.md").read_text()
    for target in ("core/plugtron/hookspecs.py", "plugins/gpt/README.md", "plugins/gpt/CONFIG.md",
                   "plugins/mamba/README.md", "plugins/hf_bridge/README.md", "SECURITY.md"):
        assert f"]({target})" in text, target


def test_troubleshooting_states_the_real_timeout():
    from plugtron.runtime.launcher import FAILURE_TIMEOUT_S

    section = (ROOT / "README.md").read_text().split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    assert f"process-group timeout of {FAILURE_TIMEOUT_S:g} s" in section
    for needed in ("`FAILURE_TIMEOUT_S` in `plugtron.runtime.launcher`", "PLUGTRON_DEBUG=1",
                   "torchrun --nproc-per-node 2 -m plugtron.cli build CONFIG --tp 2", "RANK", "MASTER_PORT"):
        assert needed in section, needed
