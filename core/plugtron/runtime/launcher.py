"""Running a command on N local ranks, and ending every rank quickly when one fails.

plugtron starts its own ranks instead of re-running itself under torchrun,
because each of torchrun's habits broke a promise plugtron makes:

- ``python -m`` puts the working directory first on ``sys.path``: a file named
  like a dependency (``pluggy.py``) in the directory a user converts from was
  imported. Here every rank runs with ``-P`` and ``PYTHONSAFEPATH=1``, so no
  working or checkpoint directory is ever on the import path, in this process's
  children or theirs.
- A failed worker made the agent print a page of tracebacks. Here each rank
  hands its one-line error to the launcher (:func:`report_error`), which prints
  the first one: the cause, not the peers that died of it.
- A signal sent to the launcher alone left the workers running for seconds.
  Here SIGTERM / SIGINT / SIGHUP are forwarded to every rank's process group,
  and a rank whose launcher dies gets SIGTERM from the kernel (Linux
  ``PR_SET_PDEATHSIG``).
- The agent's ``torchelastic_*`` folders stayed in TMPDIR. Here every rank's
  TMPDIR is a folder of this run, removed when it ends.

When one rank exits non-zero the others get SIGTERM at once and SIGKILL after
:data:`GRACE_S`: no rank waits for a collective that can never complete.

Commands started by an external launcher run directly on their rank and never
start ranks of their own; :func:`launched` is the one place that decides
whether this process is such a rank: torch's variables (``RANK`` and
``WORLD_SIZE``: torchrun on one or several nodes, this module, any launcher
that sets them) win, else SLURM's (``SLURM_PROCID`` of ``SLURM_NTASKS`` > 1
tasks inside an ``srun`` step, or with ``MASTER_ADDR`` exported), which
:func:`adopt_launch` maps onto torch's before the process group starts. A
world that does not fit the command's layout is refused on every rank before
any rendezvous (:func:`check_world`), so no rank waits for peers that never come.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Iterator, Mapping, Sequence

import attrs

from plugtron.errors import PlugtronError

#: Process-group timeout of every command: a peer that never arrives ends the job after this.
FAILURE_TIMEOUT_S = 60.0
#: Between SIGTERM and SIGKILL for ranks that must stop.
GRACE_S = 5.0
_POLL_S = 0.05
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_ERROR_DIR = "PLUGTRON_ERROR_DIR"


_MARK = "PLUGTRON_LAUNCHED"


class LaunchError(PlugtronError):
    """The launcher's environment is incomplete or does not fit the command (one line, on every rank)."""


@attrs.frozen
class Launch:
    """This rank as a launcher started it: where in the world it is, and the torch variables that say so."""

    rank: int
    world_size: int
    local_rank: int
    #: Who started it, for messages: "plugtron", "torchrun", "srun" or "the launcher".
    source: str
    #: The variable the world size came from (named in errors).
    world_var: str
    #: torch.distributed's ``env://`` variables for this rank (SLURM's mapped onto them).
    env: dict[str, str] = attrs.field(factory=dict, repr=False)


def _int_var(environ: Mapping[str, str], name: str) -> int:
    text = environ[name].strip()
    try:
        return int(text)
    except ValueError:
        raise LaunchError(f"{name}={environ[name]!r} is not a whole number") from None


def _slurm_tasks(environ: Mapping[str, str]) -> str | None:
    """The variable holding this srun step's task count (the step's own, else the job's)."""
    for name in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"):
        if name in environ:
            return name
    return None


def launched(environ: Mapping[str, str] | None = None) -> Launch | None:
    """This process's place in a multi-rank launch, or None when nothing launched it as a rank.

    torch's variables first (torchrun also runs inside SLURM jobs, whose
    variables its workers inherit). SLURM counts when ``SLURM_PROCID`` is set
    with more than one task and the process is in an ``srun`` step
    (``SLURM_STEP_ID``) or ``MASTER_ADDR`` was exported for it: a batch script
    itself (one process, no step) is no rank, and its ``plugtron`` command
    starts its own local ranks as anywhere else.
    """
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        rank, world = _int_var(environ, "RANK"), _int_var(environ, "WORLD_SIZE")
        source = ("plugtron" if environ.get(_MARK) else "torchrun" if "TORCHELASTIC_RUN_ID" in environ
                  else "the launcher")
        local = _int_var(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else rank
        return Launch(rank, world, local, source, "WORLD_SIZE", {})
    tasks = _slurm_tasks(environ)
    if "SLURM_PROCID" not in environ or tasks is None or _int_var(environ, tasks) < 2:
        return None
    if "SLURM_STEP_ID" not in environ and "MASTER_ADDR" not in environ:
        return None
    rank, world = _int_var(environ, "SLURM_PROCID"), _int_var(environ, tasks)
    local = _int_var(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0
    env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local)}
    return Launch(rank, world, local, "srun", tasks, env)


def under_launcher() -> bool:
    """True inside a rank some launcher started (this module, torchrun, srun): see :func:`launched`."""
    return launched() is not None


def adopt_launch() -> Launch | None:
    """Before ``init_process_group(init_method="env://")``: this rank's torch variables, SLURM's mapped.

    Checks what the rendezvous needs, so a missing ``MASTER_ADDR`` /
    ``MASTER_PORT`` or a rank outside the world is one line on every rank
    instead of torch's error or a wait.
    """
    launch = launched()
    if launch is None:
        return None
    if not 0 <= launch.rank < launch.world_size:
        raise LaunchError(f"{launch.source} gave rank {launch.rank} of a world of {launch.world_size} "
                          f"({launch.world_var}={launch.world_size})")
    if launch.world_size > 1:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(name):
                raise LaunchError(f"{name} is not set: {launch.source} started this rank ({launch.world_var}="
                                  f"{launch.world_size}) without a rendezvous address; export MASTER_ADDR=<first "
                                  "node's host> and MASTER_PORT=<free port> for every rank")
        _int_var(os.environ, "MASTER_PORT")
    for name, value in launch.env.items():
        os.environ.setdefault(name, value)
    return launch


def check_world(needed: int, flags: str, *, exact: bool = True) -> None:
    """Under a launcher: refuse a world size that does not fit the layout ``flags`` asks for (``needed`` ranks).

    Runs on every rank before the rendezvous, so each one exits with the same
    line at once. ``exact=False`` accepts multiples (extra ranks as data parallelism).
    """
    launch = launched()
    if launch is None or launch.world_size == needed:
        return
    if not exact and launch.world_size % needed == 0:
        return
    want = f"{needed} ranks" if exact else f"a multiple of {needed} ranks"
    raise LaunchError(f"{flags} needs {want}, but {launch.source} started {launch.world_size} "
                      f"({launch.world_var}={launch.world_size}): launch {needed} ranks in all, or change {flags}")


def python_command(module: str, argv: Sequence[str] = ()) -> list[str]:
    """``python -P -m MODULE ARGV``: never with the working directory on ``sys.path``."""
    return [sys.executable, "-P", "-m", module, *argv]


def safe_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child Python: safe import path, one thread per rank by default."""
    env = {**os.environ, "PYTHONSAFEPATH": "1", **extra}
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def report_error(message: str) -> None:
    """Print a command's one-line error, or hand it to the launcher when this rank has one."""
    try:
        launch = launched()
    except LaunchError:
        launch = None
    rank = None if launch is None else launch.rank
    if launch is not None and launch.world_size != 1:
        message = f"[rank {rank}] {message}"
    folder = os.environ.get(_ERROR_DIR)
    if folder and Path(folder).is_dir():
        with contextlib.suppress(OSError):
            (Path(folder) / f"rank{rank}").write_text(f"{time.time():.6f}\t{message}\n")
            return
    print(message, file=sys.stderr, flush=True)


def first_error(folder: Path) -> str | None:
    """The earliest error any rank reported (the cause; later ones are usually its echoes)."""
    entries = []
    for path in folder.glob("rank*"):
        stamp, _, message = path.read_text().partition("\t")
        with contextlib.suppress(ValueError):
            entries.append((float(stamp), message.rstrip("\n")))
    return min(entries)[1] if entries else None


@contextlib.contextmanager
def private_tmpdir(prefix: str = "plugtron-") -> Iterator[Path]:
    """A TMPDIR of this command's own (for it and its children), removed with what was left in it."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    saved_env, saved_tempdir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = str(folder), str(folder)
    try:
        yield folder
    finally:
        tempfile.tempdir = saved_tempdir
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        shutil.rmtree(folder, ignore_errors=True)


def free_port() -> int:
    """A loopback TCP port free right now (the rendezvous of a one-machine job)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _prctl() -> "ctypes._CFuncPtr | None":
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None


_PRCTL = _prctl()


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: own process group, SIGTERM when the launcher dies."""
    os.setsid()
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class _Ranks:
    """The rank processes of one launch, each in its own process group."""

    def __init__(self, procs: list[subprocess.Popen]) -> None:
        self.procs = procs
        self.stop_deadline: float | None = None
        self._exit_fds = _exit_fds(procs)

    def nap(self, seconds: float) -> None:
        """Wait ``seconds`` at most, waking the moment a rank still running exits.

        Why: a fixed sleep between polls added half its length, on average, to
        every command's end (the launcher noticed its last rank up to 50 ms late).
        """
        running = [fd for fd, proc in zip(self._exit_fds, self.procs) if proc.returncode is None]
        if running:
            select.select(running, [], [], seconds)
        else:
            time.sleep(seconds)

    def close(self) -> None:
        for fd in self._exit_fds:
            os.close(fd)
        self._exit_fds = []

    def send(self, signum: int) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signum)

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Ask every running rank to stop; :meth:`poll` kills them after the grace period."""
        self.send(signum)
        if self.stop_deadline is None:
            self.stop_deadline = time.monotonic() + GRACE_S

    def poll(self) -> list[int | None]:
        codes = [proc.poll() for proc in self.procs]
        if self.stop_deadline is not None and time.monotonic() > self.stop_deadline:
            self.send(signal.SIGKILL)
        return codes


def _exit_fds(procs: list[subprocess.Popen]) -> list[int]:
    """One descriptor per process that turns readable when it exits (Linux ``pidfd_open``); [] where there is none."""
    fds: list[int] = []
    try:
        for proc in procs:
            fds.append(os.pidfd_open(proc.pid))
    except (AttributeError, OSError):  # not Linux, kernel < 5.3, or a rank already reaped
        for fd in fds:
            os.close(fd)
        return []
    return fds


def _start(nproc: int, command: list[str], env: dict[str, str], logs: Path | None) -> list[subprocess.Popen]:
    procs = []
    for rank in range(nproc):
        rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        out: IO | None = open(logs / f"rank{rank}.log", "w") if logs else None  # noqa: SIM115 - closed below
        try:
            procs.append(subprocess.Popen(command, env=rank_env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                          stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent))
        finally:
            if out:
                out.close()
    return procs


def _watch(ranks: _Ranks, timeout_s: float | None) -> int:
    """Wait for every rank; the first failure (or a forwarded signal, or the timeout) stops the rest."""
    received: list[int] = []

    def forward(signum: int, frame: object) -> None:
        received.append(signum)
        ranks.stop(signum)

    previous = {sig: signal.signal(sig, forward) for sig in _FORWARDED}
    started, result = time.monotonic(), 0
    try:
        while True:
            codes = ranks.poll()
            failed = [code for code in codes if code not in (None, 0)]
            if failed and not result:
                result = failed[0] if failed[0] > 0 else 128 - failed[0]
                ranks.stop()
            if timeout_s is not None and time.monotonic() - started > timeout_s and not result:
                result = 124
                ranks.stop()
            if all(code is not None for code in codes):
                break
            ranks.nap(_POLL_S)
    finally:
        ranks.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 + received[0] if received else result


def launch(nproc: int, module: str, argv: Sequence[str], *, timeout_s: float | None = None,
           logs: Path | None = None, announce_errors: bool = True) -> int:
    """Run ``python -P -m MODULE ARGV`` on ``nproc`` local ranks; return the job's exit code.

    0 when every rank succeeded; else the first failing rank's code, 124 after
    ``timeout_s``, or 128 + N after signal N reached this process. With
    ``logs``, each rank's output goes to ``logs/rankR.log`` instead of this
    terminal. The first rank's one-line error is printed unless
    ``announce_errors`` is False.
    """
    run_dir = Path(tempfile.mkdtemp(prefix="plugtron-run-"))
    try:
        (run_dir / "errors").mkdir()
        (run_dir / "tmp").mkdir()
        env = safe_env(WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(free_port()), TMPDIR=str(run_dir / "tmp"),
                       **{_ERROR_DIR: str(run_dir / "errors"), _MARK: "1"})
        ranks = _Ranks(_start(nproc, python_command(module, argv), env, logs))
        code = _watch(ranks, timeout_s)
        message = first_error(run_dir / "errors")
        if code and message and announce_errors:
            print(message, file=sys.stderr, flush=True)
        return code
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def relaunch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``plugtron ARGV`` on ``nproc`` local ranks (the CLI's multi-rank commands)."""
    return launch(nproc, "plugtron.cli", argv)
