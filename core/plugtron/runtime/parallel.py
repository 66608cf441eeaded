"""One entry point for torch.distributed and megatron's model-parallel groups.

Works under a launcher (plugtron's own, torchrun on one or several nodes, or
srun: :func:`plugtron.runtime.launcher.launched` decides, and SLURM's variables
are mapped onto torch's ``env://`` ones) and in a plain single process (creates
a one-rank gloo group on a free loopback port). Chooses NCCL
when CUDA is present and gloo otherwise, and switches the CPU runtime on when
there is no CUDA.

Expert layouts are megatron's: the world is ``tp x cp x dp x pp`` for dense
layers and, with the same ranks, ``etp x ep x edp x pp`` for routed experts
(expert parallelism takes its ranks from data and tensor parallelism), so the
world size must be a multiple of both ``tp x cp x pp`` and ``etp x ep x pp``
(:func:`world_size_for` gives the smallest).
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import attrs

from plugtron.errors import PipelineError
from plugtron.runtime.launcher import adopt_launch, free_port


@attrs.frozen
class ParallelContext:
    """The process-group collection and sizes of this rank's model-parallel layout."""

    tp: int
    pp: int
    vp: int | None
    dp: int
    rank: int
    world_size: int
    backend: str
    device: str
    pg_collection: Any = attrs.field(repr=False)
    #: Expert model-parallel and expert tensor-parallel sizes (megatron's EP and ETP).
    ep: int = 1
    etp: int = 1

    @property
    def edp(self) -> int:
        """Expert data-parallel size: ranks holding the same expert shard."""
        return self.world_size // (self.etp * self.ep * self.pp)

    @property
    def tp_rank(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_tensor_model_parallel_rank()

    @property
    def pp_rank(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_pipeline_model_parallel_rank()

    @property
    def dp_rank(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_rank()


def _init_process_group(backend: str, timeout: datetime.timedelta) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    launch = adopt_launch()
    if launch is not None and (launch.world_size > 1 or "MASTER_ADDR" in os.environ):
        try:
            if launch.rank != 0:
                _wait_for_rendezvous_host(timeout)
            dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
        except (dist.DistStoreError, dist.DistNetworkError) as exc:  # a rank never came, or the address is wrong
            where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
            raise PipelineError(
                f"rendezvous at {where} (MASTER_ADDR:MASTER_PORT) failed for rank {launch.rank} of "
                f"{launch.world_size} ({launch.world_var}={launch.world_size}): {' '.join(str(exc).split())}"
            ) from exc
        return
    port = free_port()
    dist.init_process_group(
        backend=backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, timeout=timeout
    )


def _wait_for_rendezvous_host(timeout: datetime.timedelta) -> None:
    """Wait, ``timeout`` at most, until the rendezvous store's port accepts connections.

    torch's store client retries a connection that timed out once, after a
    random back-off (measured on torch 2.13: a 10 s timeout gave up after
    19.5 s, a 3 s one after 13 s), so a rank whose rank 0 never starts waited
    about twice the failure timeout. Plain connection attempts bound the wait;
    once the port answers, ``env://`` connects at once.

    The first retries come quickly (5 ms, doubling to 0.2 s): ranks start
    together, so rank 0's store is usually a few milliseconds from listening,
    and rank 0 in turn waits for every rank to connect. A fixed 0.2 s pause
    cost every multi-rank command about that much (measured: rank 0 spent
    0.19 s creating its store while rank 1 slept). A refused local
    connection costs microseconds, so the short pauses cost nothing.
    """
    import socket
    import time

    import torch.distributed as dist

    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    deadline = time.monotonic() + timeout.total_seconds()
    pause = 0.005
    while True:
        try:
            socket.create_connection((host, port), timeout=1.0).close()
            return
        except OSError:
            if time.monotonic() >= deadline:
                raise dist.DistNetworkError(f"nothing answered at {host}:{port} within "
                                            f"{timeout.total_seconds():.0f} s") from None
            time.sleep(pause)
            pause = min(2 * pause, 0.2)


_current_layout: dict[str, Any] = {}


def live_process_groups() -> set:
    """The process groups torch.distributed holds for this rank (empty before init).

    Reads ``distributed_c10d._world.pg_map``, a private table (there is no public
    way to list groups; checked on torch 2.13.0). Where a torch release lacks it,
    this returns an empty set: groups are then left alive on a layout change, as
    megatron itself leaves them, instead of failing.
    """
    from torch.distributed import distributed_c10d

    world = getattr(distributed_c10d, "_world", None)
    return set(getattr(world, "pg_map", None) or ())


def world_size_for(tp: int = 1, pp: int = 1, *, cp: int = 1, ep: int = 1, etp: int | None = None, dp: int | None = None) -> int:
    """The world size of a layout: ``tp x cp x dp x pp`` with ``dp`` given, else the smallest that fits the experts too."""
    import math

    etp = etp or tp
    if dp is not None:
        return tp * cp * dp * pp
    return pp * math.lcm(tp * cp, etp * ep)


def _forget_dtensor_meshes() -> None:
    """Drop torch's cached DTensor sharding decisions, which hold the meshes (and groups) of the old layout.

    A ``DeviceMesh`` compares equal to any mesh over the same ranks, whatever
    its process group, so after a layout change DTensor's sharding-propagation
    cache hands out output specs on the previous layout's mesh, whose group was
    just destroyed (measured with FSDP2 in two layouts in one process: "Could
    not resolve the process group registered under the name 3" at the next
    ``full_tensor()``). Only when DTensor was imported; the clearing functions
    are torch's own (``torch.distributed.tensor.debug``, checked on 2.13.0).
    """
    import sys

    if "torch.distributed.tensor" not in sys.modules:
        return
    from torch.distributed.tensor import debug

    clear = getattr(debug, "_clear_sharding_prop_cache", None)
    if clear is not None:
        clear()


def _initialize_groups(tp: int, pp: int, vp: int | None, cp: int, timeout_s: float, ep: int = 1, etp: int | None = None) -> None:
    """megatron's groups for this layout, reused when the layout is unchanged.

    ``destroy_model_parallel`` forgets megatron's groups without destroying
    them: re-creating them for another layout would leak ~17 groups (threads,
    file descriptors) per switch. So the groups megatron creates are noted and
    destroyed when the layout changes, and kept when it does not.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    layout = (tp, pp, vp, cp, ep, etp)
    if parallel_state.model_parallel_is_initialized():
        if _current_layout.get("layout") == layout:
            return
        parallel_state.destroy_model_parallel()
        for group in _current_layout.pop("groups", ()):
            if group in live_process_groups():
                dist.destroy_process_group(group)
        _forget_dtensor_meshes()
    before = live_process_groups()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vp,
        context_parallel_size=cp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        distributed_timeout_minutes=max(1, int(timeout_s // 60)),
    )
    _current_layout.update(layout=layout, groups=live_process_groups() - before)


def initialize_parallel(
    tp: int = 1,
    pp: int = 1,
    vp: int | None = None,
    *,
    cp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    backend: str | None = None,
    seed: int = 1234,
    timeout_s: float = 300.0,
) -> ParallelContext:
    """Initialise (or re-initialise) model parallelism and return its context.

    ``ep`` / ``etp``: expert model- and tensor-parallel sizes (``etp``
    defaults to ``tp``, as in megatron). A short ``timeout_s`` bounds how long
    a rank waits for a failed peer.
    """
    import torch
    import torch.distributed as dist
    from megatron.core.process_groups_config import ProcessGroupCollection

    from plugtron.runtime import cpu

    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise PipelineError("backend 'nccl' needs CUDA; use gloo on this machine")
    launch = adopt_launch()  # SLURM's variables as torch's, before LOCAL_RANK is read
    if not cuda:
        cpu.enable()
    elif launch is not None:
        torch.cuda.set_device(launch.local_rank)
    _init_process_group(backend, datetime.timedelta(seconds=timeout_s))
    world = dist.get_world_size()
    etp = etp or tp
    if world % (tp * pp * cp):
        raise PipelineError(f"world size {world} is not divisible by tp={tp} x pp={pp} x cp={cp}")
    if world % (etp * ep * pp):
        raise PipelineError(
            f"world size {world} is not divisible by expert_tensor_parallel={etp} x expert_model_parallel={ep} x pp={pp} "
            f"(experts reuse the data- and tensor-parallel ranks; {world_size_for(tp, pp, cp=cp, ep=ep, etp=etp)} ranks would fit)"
        )
    _initialize_groups(tp, pp, vp, cp, timeout_s, ep, etp)
    cpu.seed_everything(seed)
    return ParallelContext(
        tp=tp,
        pp=pp,
        vp=vp,
        dp=world // (tp * pp * cp),
        rank=dist.get_rank(),
        world_size=world,
        backend=backend,
        device="cuda" if cuda else "cpu",
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
        ep=ep,
        etp=etp,
    )


def destroy_parallel() -> None:
    """Tear down megatron's groups and the default process group."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    _current_layout.clear()
    if dist.is_initialized():
        dist.destroy_process_group()


def adapt_config(config: Any, parallel: ParallelContext) -> list[str]:
    """Settings the layout forces on the config; returns what was changed and why.

    Interleaved pipelining over gloo with ``batch_p2p_comm=True`` silently swaps
    activations and gradients between the two peers (measured: losses off by
    ~3e-3); separate sends are exact, so gloo + VP always uses them.
    """
    experts = getattr(config, "num_moe_experts", None)
    wanted = (config.expert_model_parallel_size or 1, config.expert_tensor_parallel_size or config.tensor_model_parallel_size)
    if experts and wanted != (parallel.ep, parallel.etp):
        raise PipelineError(
            f"config asks for expert parallelism (ep, etp) = {wanted} but the parallel context is "
            f"{(parallel.ep, parallel.etp)}: pass ep= and etp= to initialize_parallel"
        )
    changed = []
    if parallel.backend == "gloo" and parallel.vp and config.batch_p2p_comm:
        config.batch_p2p_comm = False
        changed.append("batch_p2p_comm=False (gloo with virtual pipeline stages)")
    return changed
