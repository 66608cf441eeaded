"""Running megatron-core on a machine without CUDA.

megatron-core 0.16 asks for CUDA in a handful of places even when every tensor
is on the CPU (see the project notes): ``torch.cuda.current_device()`` for the
RoPE frequencies and the attention buffer, ``device="cuda"`` in the causal mask
and the pipeline schedules, ``torch.cuda.synchronize`` in p2p, and the CUDA RNG
tracker. :func:`enable` answers all of them with the CPU, process-wide, while
leaving every real GPU run untouched (:func:`enable_if_needed` does nothing when
CUDA is present). Measured cost of the device-mapping mode: under 10% of a
forward/backward step on a small model.

Mixture-of-Experts and Multi-Latent Attention need a few more answers (the
project notes have the measurements); :func:`enable` installs each, and
:func:`disable` removes each:

* ``te_general_gemm``: megatron's router GEMM names it even when
  transformer-engine is absent (``moe_utils.py``: NameError in the allgather
  dispatcher); defined as ``None``, the plain matmul path runs.
* CUDA streams and events: the alltoall dispatcher and the overlapped shared
  expert create ``torch.cuda.Stream``/``Event`` and enter
  ``torch.cuda.stream(...)``; on the CPU everything runs in order, so
  :class:`CpuStream` and :class:`CpuEvent` do nothing, correctly.
* Split sizes: ``maybe_move_tensor_to_cpu(..., as_numpy=True)`` converts only
  CUDA tensors, so at EP > 1 ``all_to_all_single`` received torch tensors as
  split sizes (TypeError); CPU tensors are converted too.
* Uneven ``all_gather``: gloo cannot gather a list of tensors of different
  sizes (megatron does, with the alltoall dispatcher at ETP > 1 and EP > 1);
  :func:`_gather_along_first_dim` pads to the largest split, gathers with
  ``all_gather_into_tensor`` and trims (exact).
* ``HAVE_TE`` of MLA: importing megatron's transformer-engine extension
  succeeds without transformer-engine (it substitutes mocks), so MLA believed
  TE was there and ``isinstance(x, TELinear)`` raised TypeError; the flag is
  set from whether transformer-engine really imports
  (:func:`correct_transformer_engine_flags`, also used without this runtime).
* The expert-bias counter is a ``torch.compile``d one-liner: 4.2 s of
  compilation per process on this machine for a ``+=``; it runs eagerly here.

:class:`TorchNorm` is not a shim but a module layer specs use on any device: a
torch LayerNorm/RMSNorm that supports sequence parallelism and zero-centred
gamma as transformer-engine's norms do (megatron's own torch norm refuses both).
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
        # Every torch call of the process passes here: the common case (no device) copies nothing.
        if func is torch.Tensor.cuda:
            return args[0]
        if kwargs and "device" in kwargs:
            kwargs = {**kwargs, "device": _to_cpu_device(kwargs["device"])}
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _to_cpu_device(args[1]), *args[2:])
        return func(*args, **(kwargs or {}))


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


# -- streams and events -----------------------------------------------------------------
class CpuEvent:
    """A CUDA event stand-in: the CPU runs in order, so every event has happened."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


class CpuStream:
    """A CUDA stream stand-in: work on the CPU is already ordered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> CpuEvent:
        return event if event is not None else CpuEvent()

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


_CURRENT_STREAM = CpuStream()


@contextlib.contextmanager
def _cpu_stream_context(stream: Any = None) -> Iterator[Any]:
    yield stream


_CUDA_STREAM_NAMES = {
    "Stream": CpuStream,
    "Event": CpuEvent,
    "current_stream": lambda *a, **k: _CURRENT_STREAM,
    "default_stream": lambda *a, **k: _CURRENT_STREAM,
    "stream": _cpu_stream_context,
}


# -- MoE and MLA -------------------------------------------------------------------------
def maybe_move_tensor_to_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """megatron's helper, but CPU tensors become numpy arrays too when asked (split sizes)."""
    if torch.is_tensor(tensor):
        tensor = tensor.to("cpu")
        if as_numpy:
            return tensor.numpy()
    return tensor


def _gather_along_first_dim(input_: torch.Tensor, group: Any, output_split_sizes: Any = None, use_global_buffer: bool = False) -> torch.Tensor:
    """megatron's gather along dim 0; uneven splits padded, gathered into one tensor, trimmed (gloo)."""
    import torch.distributed as dist

    original = _state["mappings_gather"]
    if output_split_sizes is None or group is None or group.size() == 1:
        return original(input_, group, output_split_sizes, use_global_buffer)
    sizes = [int(s) for s in output_split_sizes]
    if len(set(sizes)) == 1:
        return original(input_, group, None, use_global_buffer)
    longest = max(sizes)
    padded = input_.new_zeros((longest, *input_.shape[1:]))
    padded[: input_.shape[0]] = input_
    gathered = input_.new_empty((longest * group.size(), *input_.shape[1:]))
    gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch 2.13 renamed it
    gather_into(gathered, padded.contiguous(), group=group)
    return torch.cat([gathered[r * longest : r * longest + size] for r, size in enumerate(sizes)], dim=0)


def transformer_engine_importable() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # an installed but broken TE (no CUDA libraries) is absent too
        return False
    return True


def correct_transformer_engine_flags() -> None:
    """Make MLA's ``HAVE_TE`` say whether transformer-engine really imports (idempotent).

    megatron's TE extension module imports without transformer-engine, so
    MLA's own probe succeeds and later ``isinstance`` checks against mock
    classes fail. Harmless where transformer-engine is installed (left as is).
    """
    if transformer_engine_importable():
        return
    from megatron.core.transformer import multi_latent_attention

    multi_latent_attention.HAVE_TE = False


def _unwrap_compiled(function: Any) -> Any:
    return getattr(function, "_torchdynamo_orig_callable", None) or getattr(function, "__wrapped__", None) or function


def _install_moe_shims() -> None:
    from megatron.core.tensor_parallel import mappings
    from megatron.core.transformer.moe import moe_utils, router, token_dispatcher

    saved: dict[str, Any] = {}
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
        saved["te_general_gemm"] = True
    for name, replacement in _CUDA_STREAM_NAMES.items():
        saved[f"cuda.{name}"] = getattr(torch.cuda, name)
        setattr(torch.cuda, name, replacement)
    saved["moe_utils.move"], saved["dispatcher.move"] = moe_utils.maybe_move_tensor_to_cpu, token_dispatcher.maybe_move_tensor_to_cpu
    moe_utils.maybe_move_tensor_to_cpu = token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    _state["mappings_gather"] = mappings._gather_along_first_dim
    mappings._gather_along_first_dim = _gather_along_first_dim
    saved["expert_bias"] = router.TopKRouter.__dict__["_apply_expert_bias"]
    router.TopKRouter._apply_expert_bias = _unwrap_compiled(saved["expert_bias"])
    if not transformer_engine_importable():
        from megatron.core.transformer import multi_latent_attention

        saved["mla_have_te"] = multi_latent_attention.HAVE_TE
        multi_latent_attention.HAVE_TE = False
    _state["moe"] = saved


def _remove_moe_shims() -> None:
    from megatron.core.tensor_parallel import mappings
    from megatron.core.transformer.moe import moe_utils, router, token_dispatcher

    saved = _state.pop("moe", {})
    if saved.pop("te_general_gemm", False):
        del moe_utils.te_general_gemm
    for name in _CUDA_STREAM_NAMES:
        setattr(torch.cuda, name, saved[f"cuda.{name}"])
    moe_utils.maybe_move_tensor_to_cpu = saved["moe_utils.move"]
    token_dispatcher.maybe_move_tensor_to_cpu = saved["dispatcher.move"]
    mappings._gather_along_first_dim = _state.pop("mappings_gather")
    router.TopKRouter._apply_expert_bias = saved["expert_bias"]
    if "mla_have_te" in saved:
        from megatron.core.transformer import multi_latent_attention

        multi_latent_attention.HAVE_TE = saved["mla_have_te"]


# -- a norm with sequence parallelism ------------------------------------------------------
class ZeroCenteredRMSNorm(torch.nn.RMSNorm):
    """RMSNorm scaling by ``1 + weight`` (initialised to 0) as Gemma's: in float32, cast back once."""

    def reset_parameters(self) -> None:
        torch.nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


class ZeroCenteredLayerNorm(torch.nn.LayerNorm):
    """Nemotron's LayerNorm1P: ``layer_norm(x, weight + 1, bias)`` in the input dtype, weight initialised to 0."""

    def reset_parameters(self) -> None:
        super().reset_parameters()
        torch.nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x, self.normalized_shape, self.weight + 1.0, self.bias, self.eps)


class TorchNorm:
    """torch ``LayerNorm``/``RMSNorm`` (per ``config.normalization``) that allows sequence parallelism.

    Under sequence parallelism each tensor-parallel rank normalises only its
    slice of the sequence, so the norm's weight and bias receive partial
    gradients. Like transformer-engine's norms, the parameters are marked
    ``sequence_parallel``: megatron's ``finalize_model_grads`` (DDP) and
    :mod:`plugtron.training` (plain chunks) then sum them over the TP group.
    ``sum_grads_over_tp=True`` marks them whatever the config says: per-head q/k
    norms see only this rank's heads, so their grads are partial at any TP > 1.
    The module is the plain torch class (state dicts unchanged), or with
    ``layernorm_zero_centered_gamma`` :class:`ZeroCenteredRMSNorm` /
    :class:`ZeroCenteredLayerNorm` (same parameter names, weights start at 0).
    """

    def __new__(  # type: ignore[misc]
        cls, config: Any, hidden_size: int, eps: float = 1e-5, sum_grads_over_tp: bool = False, **_: Any
    ) -> torch.nn.Module:
        zero = bool(getattr(config, "layernorm_zero_centered_gamma", False))
        normalization = getattr(config, "normalization", "LayerNorm")
        if normalization == "LayerNorm":
            kind: type = ZeroCenteredLayerNorm if zero else torch.nn.LayerNorm
        elif normalization == "RMSNorm":
            kind = ZeroCenteredRMSNorm if zero else torch.nn.RMSNorm
        else:
            raise ValueError(f"the torch norm supports LayerNorm and RMSNorm, not {normalization!r}")
        norm: torch.nn.Module = kind(hidden_size, eps=eps, dtype=config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = bool(config.sequence_parallel) or sum_grads_over_tp
        return norm


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
        _install_moe_shims()


def disable() -> None:
    """Undo :func:`enable` (used by tests that check GPU-path selection)."""
    with _lock:
        if not _state:
            return
        from megatron.core.tensor_parallel import random as mp_random

        _remove_moe_shims()
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
