"""Running megatron-core on a machine without CUDA.

megatron-core 0.16 asks for CUDA in a handful of places even when every tensor
is on the CPU (see the project notes): ``torch.cuda.current_device()`` for the
RoPE frequencies and the attention buffer, ``device="cuda"`` in the causal mask
and the pipeline schedules, ``torch.cuda.synchronize`` in p2p, and the CUDA RNG
tracker. :func:`enable` answers all of them with the CPU, process-wide, while
leaving every real GPU run untouched (:func:`enable_if_needed` does nothing when
CUDA is present). Measured cost of the device-mapping mode: under 10% of a
forward/backward step on a small model.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode

_lock = threading.Lock()
_state: dict[str, Any] = {}


def _to_cpu_device(device: Any) -> Any:
    if isinstance(device, torch.device):
        return torch.device("cpu") if device.type == "cuda" else device
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device("cpu")
    return device


class CudaToCpuMode(TorchFunctionMode):
    """Maps ``device="cuda"``, ``Tensor.cuda()`` and ``.to("cuda")`` onto the CPU."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _to_cpu_device(args[1]), *args[2:])
        return func(*args, **kwargs)


class CpuRNGStatesTracker:
    """megatron's RNG tracker with the CPU generator standing in for CUDA's.

    Keeps megatron's semantics: named states forked for tensor-parallel regions
    (dropout) so runs are reproducible and ranks differ where they should.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


def _install_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mp_random

    tracker = CpuRNGStatesTracker()
    _state["rng"] = (mp_random._CUDA_RNG_STATE_TRACKER, mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED)
    mp_random._CUDA_RNG_STATE_TRACKER = tracker
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    _state["initialize_rng_tracker"] = mp_random.initialize_rng_tracker
    # megatron re-creates its tracker on model_parallel_cuda_manual_seed; keep ours.
    mp_random.initialize_rng_tracker = lambda *a, **k: tracker.reset() if k.get("force_reset") else None


def is_enabled() -> bool:
    return bool(_state)


def enable() -> None:
    """Switch the CPU runtime on for this process (idempotent)."""
    with _lock:
        if _state:
            return
        _state["current_device"] = torch.cuda.current_device
        _state["synchronize"] = torch.cuda.synchronize
        torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
        torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
        mode = CudaToCpuMode()
        mode.__enter__()
        _state["mode"] = mode
        _install_rng_tracker()


def disable() -> None:
    """Undo :func:`enable` (used by tests that check GPU-path selection)."""
    with _lock:
        if not _state:
            return
        from megatron.core.tensor_parallel import random as mp_random

        _state["mode"].__exit__(None, None, None)
        torch.cuda.current_device = _state["current_device"]
        torch.cuda.synchronize = _state["synchronize"]
        mp_random._CUDA_RNG_STATE_TRACKER, mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = _state["rng"]
        mp_random.initialize_rng_tracker = _state["initialize_rng_tracker"]
        _state.clear()


def enable_if_needed() -> bool:
    """Enable the CPU runtime when CUDA is absent. Returns whether it is on."""
    if not torch.cuda.is_available():
        enable()
    return is_enabled()


def seed_everything(seed: int) -> None:
    """Seed torch and megatron's tracked RNG states (CPU or CUDA)."""
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
