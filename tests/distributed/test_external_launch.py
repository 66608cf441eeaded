"""``plugtron convert`` / ``verify`` under an external launcher: two torchrun agents as two "nodes"
on 127.0.0.1 (c10d rendezvous), two plain processes as srun would start them, and a world that does
not fit the layout (one line on every rank, at once).

The commands run as users run them (``torchrun ... -m plugtron.cli``, ``python -m plugtron.cli``),
each "node" in its own process tree, so nothing here shares state with the test process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf_bridge"))
from hfb_helpers import bit_exact, make_hf  # noqa: E402

from plugtron.runtime.launcher import LaunchError, adopt_launch, free_port, launched  # noqa: E402

TORCHRUN = Path(sys.executable).with_name("torchrun")
#: Variables of the launcher running these tests (a CI job may itself run under srun or torchrun).
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "GROUP_RANK", "ROLE_RANK", "PLUGTRON_ERROR_DIR", "PLUGTRON_LAUNCHED")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCH_VARS and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    return {**env, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1", **extra}


def _run_all(commands: list[tuple[list[str], dict[str, str]]], cwd: Path, timeout: float) -> list[tuple[int, str, str]]:
    """Start every command at once (each in its own session), wait for all; (code, stdout, stderr) each."""
    procs = [subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              stdin=subprocess.DEVNULL, start_new_session=True) for cmd, env in commands]
    deadline, results = time.monotonic() + timeout, []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((proc.returncode, out, err))
    finally:
        for proc in procs:  # a hang must not outlive the test: end each node's process group (ours only)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return results


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf(tmp_path_factory.mktemp("external") / "hf", tokenizer=True)


def _torchrun(node: int, port: int, argv: list[str]) -> list[str]:
    return [str(TORCHRUN), "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--max-restarts", "0",
            "-m", "plugtron.cli", *argv]


@pytest.mark.multiprocess
def test_two_torchrun_nodes_convert_with_verify_and_one_writer(hf: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    port = free_port()
    argv = ["convert", str(hf), str(work / "meg"), "--to", "megatron", "--tp", "2", "--verify", "--no-progress"]
    started = time.perf_counter()
    nodes = _run_all([(_torchrun(node, port, argv), _env()) for node in (0, 1)], tmp_path, timeout=150)
    elapsed = time.perf_counter() - started
    for node, (code, out, err) in enumerate(nodes):
        assert code == 0, f"node {node} exited {code}:\n{out}\n{err[-3000:]}"
    outputs = nodes[0][1] + nodes[1][1]
    assert outputs.count("-> OK") == 1 and outputs.count("converted LlamaForCausalLM") == 1, outputs
    # One writer: the destination exists once, complete, and nothing else was left next to it.
    assert sorted(p.name for p in work.iterdir()) == ["meg"]
    names = {p.name for p in (work / "meg").iterdir()}
    assert {"plugtron_model.json", "hf_bridge.json", "tokenizer_config.json"} <= names, names
    # Each node read only its rank's share (TP=2: about half of the checkpoint), never the whole file.
    total = (hf / "model.safetensors").stat().st_size
    reads = [int(line.split(":")[1].split()[0].replace(",", "")) for line in nodes[0][1].splitlines()
             if line.strip().startswith("rank ")]
    assert len(reads) == 2 and all(0 < r < 0.75 * total for r in reads), (reads, total)
    assert elapsed < 60, f"two-node convert took {elapsed:.0f} s"
    # Complete: it converts back (one process) bit-exactly.
    back = subprocess.run([sys.executable, "-m", "plugtron.cli", "convert", str(work / "meg"), str(tmp_path / "back"),
                           "--to", "hf", "--no-progress"], env=_env(), cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert back.returncode == 0, back.stderr[-3000:]
    assert bit_exact(hf, tmp_path / "back") == []


def _slurm(rank: int, tasks: int, port: int, **extra: str) -> dict[str, str]:
    return _env(SLURM_PROCID=str(rank), SLURM_NTASKS=str(tasks), SLURM_LOCALID=str(rank), SLURM_JOB_ID="4242",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **extra)


@pytest.mark.multiprocess
def test_srun_style_ranks_verify_at_tp2(hf: Path, tmp_path: Path) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "plugtron.cli", "verify", str(hf), "--tp", "2"]
    started = time.perf_counter()
    ranks = _run_all([(cmd, _slurm(rank, 2, port)) for rank in (0, 1)], tmp_path, timeout=120)
    elapsed = time.perf_counter() - started
    for rank, (code, out, err) in enumerate(ranks):
        assert code == 0, f"rank {rank} exited {code}:\n{out}\n{err[-3000:]}"
    assert "tp=2" in ranks[0][1] and "-> OK" in ranks[0][1], ranks[0][1]
    assert ranks[1][1].strip() == ""  # rank 1 computed its half; rank 0 reports
    assert elapsed < 60, f"srun-style verify took {elapsed:.0f} s"


@pytest.mark.multiprocess
@pytest.mark.parametrize("style", ["srun", "torchrun"])
def test_a_world_that_does_not_fit_is_one_line_on_every_rank_at_once(hf: Path, tmp_path: Path, style: str) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "plugtron.cli", "verify", str(hf), "--tp", "4"]
    if style == "srun":
        envs = [_slurm(rank, 2, port) for rank in (0, 1)]
        world = "srun started 2 (SLURM_NTASKS=2)"
    else:
        envs = [_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                     TORCHELASTIC_RUN_ID="t") for r in (0, 1)]
        world = "torchrun started 2 (WORLD_SIZE=2)"
    started = time.perf_counter()
    ranks = _run_all([(cmd, env) for env in envs], tmp_path, timeout=60)
    elapsed = time.perf_counter() - started
    for rank, (code, out, err) in enumerate(ranks):
        assert code == 2, (rank, code, err)
        assert err.strip().splitlines() == [
            f"[rank {rank}] plugtron: error: --tp 4 needs 4 ranks, but {world}: launch 4 ranks in all, or change --tp 4"
        ], err
    assert elapsed < 20, f"took {elapsed:.0f} s"  # refused before any rendezvous: no rank waits for a peer


# -- who launched this process: decided in one place ----------------------------------------------
def test_torch_variables_win_over_slurm_ones() -> None:
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "TORCHELASTIC_RUN_ID": "x",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"}
    launch = launched(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.source) == (3, 4, 1, "torchrun")


def test_slurm_counts_in_an_srun_step_or_with_master_addr_only() -> None:
    step = {"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "1",
            "SLURM_STEP_ID": "0"}
    launch = launched(step)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.world_var) == (1, 2, 1, "SLURM_STEP_NUM_TASKS")
    assert launch.env == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    batch_script = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "1"}
    assert launched(batch_script) is None  # the batch script itself: plugtron starts its own ranks
    assert launched({**batch_script, "MASTER_ADDR": "node1"}).world_size == 4
    assert launched({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"}) is None  # one task
    assert launched({}) is None


def test_srun_without_a_rendezvous_address_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _LAUNCH_VARS:  # set, then removed: monkeypatch restores (removes) them whatever happens
        monkeypatch.setenv(name, "0")
        monkeypatch.delenv(name)
    for name, value in {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(LaunchError, match=r"^MASTER_ADDR is not set: srun started this rank \(SLURM_NTASKS=2\)"):
        adopt_launch()
    monkeypatch.setenv("SLURM_PROCID", "x")
    with pytest.raises(LaunchError, match=r"SLURM_PROCID='x' is not a whole number"):
        launched()


@pytest.mark.multiprocess
def test_a_rank_whose_rank_0_never_comes_gives_up_within_the_timeout(tmp_path: Path) -> None:
    """torch's store client retries a timed-out connection after a random back-off (measured: 28.8 s for a
    20 s timeout, 19.5 s for 10 s); plugtron's own probe keeps the wait at the timeout."""
    timeout = 20.0
    script = ("import sys, time\n"
              "import megatron.core.parallel_state, torch.distributed  # imports outside the measured wait\n"
              "from plugtron.runtime.parallel import initialize_parallel\n"
              "start = time.monotonic()\n"
              "try:\n"
              f"    initialize_parallel(2, timeout_s={timeout})\n"
              "except Exception as error:\n"
              "    print(f'{time.monotonic() - start:.2f}', error, file=sys.stderr)\n")
    env = _env(RANK="1", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    line = done.stderr.strip().splitlines()[-1]
    assert "rendezvous at 127.0.0.1" in line and "failed for rank 1 of 2" in line, done.stderr[-2000:]
    assert float(line.split()[0]) < 1.2 * timeout, line
