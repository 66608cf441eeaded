"""plugtron's own rank launcher: no working directory on sys.path, the first failure ends every
rank, signals reach the ranks, and nothing stays behind in TMPDIR.

The ranks here are tiny Python modules (no torch), so each launch costs a Python start-up.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from plugtron.runtime.launcher import GRACE_S, launch

RANK_MODULE = """
import os, sys, tempfile, time
from pathlib import Path
rank = int(os.environ["RANK"])
out = Path(os.environ["TEST_OUT"])
(out / f"pid{rank}").write_text(str(os.getpid()))
Path(tempfile.mkdtemp(prefix="left-behind-"))  # a temp dir this rank never removes
mode = os.environ.get("TEST_MODE", "")
if mode == "shadow":
    import pluggy  # must be the installed one, never ./pluggy.py
elif mode == "fail_rank1" and rank == 1:
    from plugtron.runtime.launcher import report_error
    report_error("plugtron: error: the real cause on rank 1")
    sys.exit(3)
elif mode == "fail_rank1":
    time.sleep(0.5)
    from plugtron.runtime.launcher import report_error
    report_error("plugtron: error: an echo of the cause on rank 0")
    time.sleep(60)
elif mode == "sleep":
    time.sleep(60)
"""


@pytest.fixture()
def ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with the rank module on PYTHONPATH, a private TMPDIR and an output folder."""
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "rank_module.py").write_text(RANK_MODULE)
    (tmp_path / "out").mkdir()
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "mods"))
    monkeypatch.setenv("TEST_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # gettempdir() caches its first answer
    return tmp_path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def _pids(out: Path, n: int = 2, timeout: float = 20) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = [out / f"pid{r}" for r in range(n)]
        if all(f.is_file() and f.read_text() for f in files):
            return [int(f.read_text()) for f in files]
        time.sleep(0.05)
    raise AssertionError("the ranks never started")


def test_a_file_named_like_a_dependency_in_the_working_directory_is_never_imported(ranks, monkeypatch):
    shadow = ranks / "cwd"
    shadow.mkdir()
    marker = ranks / "marker"
    (shadow / "pluggy.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    monkeypatch.chdir(shadow)
    monkeypatch.setenv("TEST_MODE", "shadow")
    assert launch(2, "rank_module", []) == 0
    assert not marker.exists()


def test_nothing_the_ranks_leave_in_tmpdir_stays_behind(ranks):
    assert launch(2, "rank_module", []) == 0
    assert list((ranks / "tmp").iterdir()) == []


def test_the_first_failure_ends_every_rank_and_only_its_error_is_printed(ranks, monkeypatch, capfd):
    monkeypatch.setenv("TEST_MODE", "fail_rank1")
    started = time.monotonic()
    code = launch(2, "rank_module", [])
    elapsed = time.monotonic() - started
    assert code == 3
    assert elapsed < GRACE_S + 5, f"took {elapsed:.1f} s"
    err = capfd.readouterr().err
    assert err.strip() == "[rank 1] plugtron: error: the real cause on rank 1"
    assert not any(_alive(pid) for pid in _pids(ranks / "out"))


def _launcher_process(ranks: Path) -> subprocess.Popen:
    code = "import sys; from plugtron.runtime.launcher import launch; sys.exit(launch(2, 'rank_module', []))"
    env = {**os.environ, "TEST_MODE": "sleep"}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_launcher_alone_stops_every_rank(ranks, signum):
    launcher = _launcher_process(ranks)
    pids = _pids(ranks / "out")
    started = time.monotonic()
    launcher.send_signal(signum)  # the launcher only: the ranks run in process groups of their own
    assert launcher.wait(timeout=GRACE_S + 10) == 128 + signum
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids), "a rank outlived its launcher"
    assert time.monotonic() - started < GRACE_S + 5
    assert list((ranks / "tmp").iterdir()) == []


def test_ranks_die_with_a_killed_launcher(ranks):
    launcher = _launcher_process(ranks)
    pids = _pids(ranks / "out")
    launcher.kill()  # no handler can run: the kernel's parent-death signal must do it
    launcher.wait(timeout=10)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids), "a rank outlived its killed launcher"


def test_a_timeout_stops_the_job(ranks, monkeypatch):
    monkeypatch.setenv("TEST_MODE", "sleep")
    started = time.monotonic()
    assert launch(2, "rank_module", [], timeout_s=1) == 124
    assert time.monotonic() - started < GRACE_S + 5
    assert not any(_alive(pid) for pid in _pids(ranks / "out"))


def test_rank_logs_go_to_files_when_asked(ranks, monkeypatch):
    module = ranks / "mods" / "talker.py"
    module.write_text(textwrap.dedent("""
        import os
        print("hello from", os.environ["RANK"], "of", os.environ["WORLD_SIZE"])
    """))
    logs = ranks / "logs"
    logs.mkdir()
    assert launch(2, "talker", [], logs=logs) == 0
    assert [(logs / f"rank{r}.log").read_text() for r in range(2)] == ["hello from 0 of 2\n", "hello from 1 of 2\n"]


def test_the_launcher_wakes_when_a_rank_exits_not_at_the_end_of_its_pause():
    from plugtron.runtime.launcher import _Ranks

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.2)"])
    ranks = _Ranks([proc])
    try:
        started = time.monotonic()
        ranks.nap(60)
        assert time.monotonic() - started < 30  # woken by the exit (0.2 s), not by the 60 s pause
        assert proc.wait(timeout=5) == 0
    finally:
        ranks.close()
