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


# -- what a stranger's files can be --------------------------------------------------------------------
def edit_header(folder: Path, change: Callable[[dict], str]) -> None:
    """Rewrite ``model.safetensors``'s JSON header with ``change(header) -> new header text``."""
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    text = change(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + length:])


def overlapping(header: dict) -> str:
    """The second layer's q_proj points at the first layer's bytes (same size)."""
    a, b = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    header[b]["data_offsets"] = header[a]["data_offsets"]
    return json.dumps(header)


def duplicated(header: dict) -> str:
    """One tensor listed twice: JSON lets the second entry win silently."""
    name = "model.norm.weight"
    text = json.dumps(header)
    return text[:-1] + f", {json.dumps(name)}: {json.dumps(header[name])}}}"


def integer_weights(header: dict) -> str:
    header["model.norm.weight"]["dtype"] = "I32"  # same bytes per element as F32
    return json.dumps(header)


def link_out(name: str) -> Callable[[Path], None]:
    def prepare(work: Path) -> None:
        (work / "secret").write_text("a private key")
        (work / "hf" / name).unlink(missing_ok=True)
        (work / "hf" / name).symlink_to(work / "secret")
    return prepare


def config_to_dev_zero(work: Path) -> None:
    (work / "hf" / "config.json").unlink()
    (work / "hf" / "config.json").symlink_to("/dev/zero")


def shell_in_config(work: Path) -> None:
    text = (ROOT / "examples" / "configs" / "default.yaml").read_text()
    text += f"activation_func: {{function: 'os:system', args: ['touch {work / 'marker'}']}}\n"
    (work / "evil.yaml").write_text(text)


def import_path_in_config(work: Path) -> None:
    (work / "mods" / "evil_module.py").write_text(f"open({str(work / 'marker')!r}, 'w')\ndef act(x):\n    return x\n")
    text = (ROOT / "examples" / "configs" / "default.yaml").read_text() + "activation_func: 'evil_module:act'\n"
    (work / "evil.yaml").write_text(text)


def nothing(work: Path) -> None:
    pass


TO_MEGATRON = lambda w: ["convert", w / "hf", w / "out", "--to", "megatron"]  # noqa: E731
BUILD_EVIL = lambda w: ["build", w / "evil.yaml"]  # noqa: E731

#: (id, prepare the work folder, argv, needles the one error line must hold)
Row = tuple[str, Callable[[Path], None], Callable[[Path], list], tuple[str, ...]]

ROWS: list[Row] = [
    ("convert onto its own source, --overwrite", nothing,
     lambda w: ["convert", w / "hf", w / "hf", "--to", "megatron", "--overwrite"], ("is the source",)),
    ("convert into a folder inside the source", nothing,
     lambda w: ["convert", w / "hf", w / "hf" / "out", "--to", "megatron", "--overwrite"], ("lies inside the source",)),
    ("convert over a folder that contains the source", nothing,
     lambda w: ["convert", w / "hf", w, "--to", "megatron", "--overwrite"], ("contains the source",)),
    ("convert onto an existing destination", nothing,
     lambda w: ["convert", w / "hf", w / "hf2", "--to", "megatron"], ("already exists", "--overwrite")),
    ("--tp 0", nothing, lambda w: ["convert", w / "hf", w / "out", "--to", "megatron", "--tp", "0"], ("--tp", "at least 1")),
    ("--pp -1", nothing, lambda w: ["verify", w / "hf", "--pp", "-1"], ("--pp", "at least 1")),
    ("build --tp 0", nothing, lambda w: ["build", ROOT / "examples" / "configs" / "default.yaml", "--tp", "0"],
     ("--tp", "at least 1")),
    ("-p a module that does not exist", nothing,
     lambda w: ["-p", "no_such_plugtron_plugin", "plugins"], ("-p no_such_plugtron_plugin", "No module named")),
    ("-p a module that raises at import", nothing,
     lambda w: ["-p", "raising_plugin", "plugins"], ("-p raising_plugin", "ZeroDivisionError")),
    ("megatron checkpoint that is not one", nothing,
     lambda w: ["convert", w / "hf", w / "out", "--to", "hf"], ("not a plugtron megatron checkpoint",)),
    ("missing HF source", nothing, lambda w: ["convert", w / "nothing", w / "out", "--to", "megatron"], ("nothing",)),
    ("safetensors: two tensors share bytes", lambda w: edit_header(w / "hf", overlapping), TO_MEGATRON,
     ("model.safetensors", "model.layers.1.self_attn.q_proj.weight")),
    ("safetensors: a tensor listed twice", lambda w: edit_header(w / "hf", duplicated), TO_MEGATRON,
     ("model.safetensors", "model.norm.weight", "twice")),
    ("safetensors: float weight stored as int32", lambda w: edit_header(w / "hf", integer_weights), TO_MEGATRON,
     ("model.norm.weight", "int32")),
    ("config.json is a link to /dev/zero", config_to_dev_zero, TO_MEGATRON, ("config.json",)),
    ("tokenizer file links outside the checkpoint", link_out("tokenizer_config.json"), TO_MEGATRON,
     ("tokenizer_config.json", "outside")),
    ("config runs a shell command through a partial", shell_in_config, BUILD_EVIL, ("activation_func", "os:system")),
    ("config names a module beside it", import_path_in_config, BUILD_EVIL, ("activation_func", "evil_module:act")),
]


@pytest.mark.parametrize("row", ROWS, ids=[row[0] for row in ROWS])
def test_bad_input_is_one_clear_line_and_loses_nothing(row: Row, work: Path, capsys, monkeypatch) -> None:
    _, prepare, make_argv, needles = row
    (work / "hf2").mkdir()
    (work / "hf2" / "keep").write_text("a user's file")
    (work / "mods").mkdir()
    (work / "mods" / "raising_plugin.py").write_text("1 / 0\n")
    monkeypatch.syspath_prepend(str(work / "mods"))
    prepare(work)
    before = digest(work)
    code, err = run_cli(capsys, make_argv(work))
    assert_one_line(code, err, *needles)
    assert not (work / "marker").exists(), "code from the input ran"
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


@pytest.fixture(scope="module")
def megatron_checkpoint(pristine: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("meg") / "meg"
    assert main(["convert", str(pristine), str(out), "--to", "megatron", "--no-progress"]) == 0
    return out


def test_disk_full_mid_export_to_hf(megatron_checkpoint: Path, small_fs: Path, capsys) -> None:
    before = digest(megatron_checkpoint)
    code, err = run_cli(capsys, ["convert", megatron_checkpoint, small_fs / "hf", "--to", "hf", "--no-progress"])
    assert_one_line(code, err, str(small_fs / "hf"), "No space left on device", "nothing was written")
    assert list(small_fs.iterdir()) == [] and digest(megatron_checkpoint) == before


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


def test_python_m_plugtron_cli_never_imports_from_the_working_directory(work: Path) -> None:
    """``python -m plugtron.cli`` (torchrun's and srun's way) without ``-P`` or ``PYTHONSAFEPATH``
    from a folder holding ``pluggy.py`` / ``attrs.py``: the real ones load, the bait never runs."""
    cwd = work / "cwd-m"
    cwd.mkdir()
    marker = work / "marker-m"
    for name in ("pluggy.py", "attrs.py", "torch.py"):
        (cwd / name).write_text(f"open({str(marker)!r}, 'a').write({name!r})\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    done = subprocess.run([sys.executable, "-m", "plugtron.cli", "plugins"], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loaded" in done.stdout and not marker.exists()


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


@pytest.mark.multiprocess
def test_sigterm_to_the_launcher_alone_ends_every_rank_and_writes_nothing(work: Path) -> None:
    """``convert --tp 2`` killed while its ranks work: within seconds no rank is left, and the
    destination never appears (before, the ranks outlived the launcher and wrote it)."""
    import signal
    import time

    out = work / "out"
    launcher = subprocess.Popen([PLUGTRON, "convert", work / "hf", out, "--to", "megatron", "--tp", "2", "--no-progress"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while len(_processes_mentioning(str(out))) < 3 and time.monotonic() < deadline:  # the launcher and two ranks
        time.sleep(0.1)
    assert len(_processes_mentioning(str(out))) >= 3, "the ranks never started"
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=15) == 128 + signal.SIGTERM
    time.sleep(1)
    assert _processes_mentioning(str(out)) == []
    time.sleep(3)  # a surviving rank would publish the output now
    assert not out.exists() and leftovers(work) == []
