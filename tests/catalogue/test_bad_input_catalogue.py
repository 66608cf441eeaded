"""The catalogue: bad inputs and faults, each through the real ``plugtron`` command line.

Every row states what a user (or an attacker) hands plugtron, and the promise
checked for it: exit code non-zero, exactly one line on stderr that names the
culprit, no traceback, the source's bytes unchanged, nothing half-written next
to the destination, and no marker file from code that must never run. Rows run
``plugtron.cli.main`` in this process (the checks run before any rank starts);
the faults that need a process of their own (file size limit, cwd on the
import path) run the installed command.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from plugtron.cli import main

sys.path.insert(0, str(Path(__file__).parents[1] / "hf_bridge"))
from hfb_helpers import make_hf  # noqa: E402

PLUGTRON = Path(sys.executable).with_name("plugtron")
ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return make_hf(tmp_path_factory.mktemp("pristine") / "hf", "LlamaForCausalLM", layers=2, tokenizer=True)


@pytest.fixture()
def work(tmp_path: Path, pristine: Path) -> Path:
    shutil.copytree(pristine, tmp_path / "hf")
    return tmp_path


def digest(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (links as their target text) -> a hash of its bytes."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            out[str(path.relative_to(folder))] = "link:" + os.readlink(path)
        elif path.is_file():
            out[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders an atomic writer left behind."""
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    return code, capsys.readouterr().err.strip()


def assert_one_line(code: int, err: str, *needles: str) -> None:
    assert code != 0, err
    lines = err.splitlines()
    assert "Traceback" not in err, err
    assert len([line for line in lines if "error" in line]) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)


# -- rows: (id, make argv from the work folder, needles in the error) ---------------------------------
Row = tuple[str, Callable[[Path], list], tuple[str, ...]]

ROWS: list[Row] = [
    ("convert onto its own source, --overwrite",
     lambda w: ["convert", w / "hf", w / "hf", "--to", "megatron", "--overwrite"], ("is the source",)),
    ("convert into a folder inside the source",
     lambda w: ["convert", w / "hf", w / "hf" / "out", "--to", "megatron", "--overwrite"], ("lies inside the source",)),
    ("convert over a folder that contains the source",
     lambda w: ["convert", w / "hf", w, "--to", "megatron", "--overwrite"], ("contains the source",)),
    ("convert onto an existing destination",
     lambda w: ["convert", w / "hf", w / "hf2", "--to", "megatron"], ("already exists", "--overwrite")),
    ("--tp 0", lambda w: ["convert", w / "hf", w / "out", "--to", "megatron", "--tp", "0"], ("--tp", "at least 1")),
    ("--pp -1", lambda w: ["verify", w / "hf", "--pp", "-1"], ("--pp", "at least 1")),
    ("build --tp 0", lambda w: ["build", ROOT / "examples" / "configs" / "default.yaml", "--tp", "0"], ("--tp", "at least 1")),
    ("-p a module that does not exist",
     lambda w: ["-p", "no_such_plugtron_plugin", "plugins"], ("-p no_such_plugtron_plugin", "No module named")),
    ("-p a module that raises at import",
     lambda w: ["-p", "raising_plugin", "plugins"], ("-p raising_plugin", "ZeroDivisionError")),
    ("megatron checkpoint that is not one",
     lambda w: ["convert", w / "hf", w / "out", "--to", "hf"], ("not a plugtron megatron checkpoint",)),
    ("missing HF source", lambda w: ["convert", w / "nothing", w / "out", "--to", "megatron"], ("nothing",)),
]


@pytest.mark.parametrize("row", ROWS, ids=[row[0] for row in ROWS])
def test_bad_input_is_one_clear_line_and_loses_nothing(row: Row, work: Path, capsys, monkeypatch) -> None:
    _, make_argv, needles = row
    (work / "hf2").mkdir()
    (work / "hf2" / "keep").write_text("a user's file")
    (work / "mods").mkdir()
    (work / "mods" / "raising_plugin.py").write_text("1 / 0\n")
    monkeypatch.syspath_prepend(str(work / "mods"))
    before = digest(work)
    code, err = run_cli(capsys, make_argv(work))
    assert_one_line(code, err, *needles)
    assert digest(work) == before  # nothing written, nothing destroyed
    assert leftovers(work) == []


# -- faults of the destination's file system ---------------------------------------------------------
@pytest.fixture()
def small_fs(tmp_path: Path):
    """A 256 KiB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_mid_export_keeps_the_old_destination(work: Path, small_fs: Path, capsys) -> None:
    old = small_fs / "out"
    old.mkdir()
    (old / "model.safetensors").write_text("the previous conversion")
    code, err = run_cli(capsys, ["convert", work / "hf", old, "--to", "megatron", "--overwrite", "--no-progress"])
    assert_one_line(code, err, str(old), "No space left on device", "nothing was written")
    assert digest(old) == {"model.safetensors": hashlib.sha256(b"the previous conversion").hexdigest()}
    assert leftovers(small_fs) == []


def test_read_only_destination_parent(work: Path, small_fs: Path, capsys) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    code, err = run_cli(capsys, ["convert", work / "hf", small_fs / "out", "--to", "megatron", "--no-progress"])
    assert_one_line(code, err, str(small_fs / "out"), "Read-only file system")


def test_file_size_limit_is_an_error_not_a_killed_process(work: Path) -> None:
    limit = 64 * 1024  # smaller than the checkpoint: the first weights file passes it

    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run([PLUGTRON, "convert", work / "hf", work / "out", "--to", "megatron", "--no-progress"],
                          capture_output=True, text=True, preexec_fn=set_limit, timeout=300)
    assert_one_line(done.returncode, done.stderr.strip(), str(work / "out"), "File too large")
    assert not (work / "out").exists() and leftovers(work) == []


@pytest.mark.multiprocess
def test_a_relaunch_never_imports_from_the_working_directory(work: Path) -> None:
    """``verify --tp 2`` from a folder holding ``pluggy.py``: the ranks import the real pluggy,
    print the JSON report (not text), and leave nothing in TMPDIR."""
    cwd, tmp = work / "cwd", work / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    marker = work / "marker"
    for name in ("pluggy.py", "torch.py", "megatron.py"):
        (cwd / name).write_text(f"open({str(marker)!r}, 'a').write({name!r})\n")
    done = subprocess.run([PLUGTRON, "verify", work / "hf", "--tp", "2", "--json"], cwd=cwd, capture_output=True,
                          text=True, timeout=400, env={**os.environ, "TMPDIR": str(tmp)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert not marker.exists()
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["ok"] is True and report["layout"].startswith("tp=2")
    assert list(tmp.iterdir()) == []
