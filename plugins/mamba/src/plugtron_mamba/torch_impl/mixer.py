"""Mamba-2 mixer in plain PyTorch, parameter-compatible with megatron-core.

megatron-core 0.16's ``megatron.core.ssm.mamba_mixer.MambaMixer`` refuses to
construct without ``mamba_ssm`` and imports Triton at module import, so it cannot
even be imported on a CPU-only machine.  :class:`TorchMambaMixer` accepts the same
constructor keywords, builds the same parameters (names, shapes, dtypes,
``tensor_model_parallel`` flags and in_proj row layout) with the same
initialisation recipe, and computes the same function using ordinary PyTorch ops
(:func:`~plugtron_mamba.torch_impl.ssd.ssd_chunked` for the scan).  A state dict
(or distributed checkpoint) saved by either class loads into the other.

Tensor parallelism follows megatron: heads and B/C groups are divided evenly
between TP ranks; ``in_proj`` is column-parallel and each rank's local output rows
are ``[z | x | B | C | dt]`` for *its* heads/groups; ``out_proj`` is row-parallel.
Only the training / prefill computation is implemented: inference caches,
packed sequences and context parallelism raise ``NotImplementedError``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional, Tuple

import torch
from torch import nn

from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.utils import deprecate_inference_params

from .norm import GatedRMSNorm
from .params import (
    TorchMambaMixerSubmodules,
    init_A_log,
    init_dt_bias,
    mark_tensor_parallel,
    rng_fork,
)
from .inner import InnerShape, conv_scan_norm

__all__ = ["TorchMambaMixer", "TorchMambaMixerSubmodules"]

#: Longest chunk the PyTorch scan uses. ``chunk_size`` is the fused GPU kernels'
#: tile; the scan's result does not depend on it (tests check), only its cost:
#: in-chunk work grows with the chunk, state work with the number of chunks.
#: Measured on CPU (one thread, L = 512 and 2048, 16-24 heads of 64, state
#: 64-128), 64 was fastest for forward and backward: at state 128, chunk 256
#: took 2.0x (fwd) and 2.3x (fwd+bwd) the time of 64, and chunk 32 2.1x / 1.9x.
SCAN_CHUNK_LIMIT = 64


class TorchMambaMixer(MegatronModule):
    """Drop-in, Triton-free replacement for megatron-core's ``MambaMixer``.

    Arguments are those of megatron 0.16.1's ``MambaMixer``.  As in megatron,
    ``d_state``, ``headdim``, ``ngroups`` and ``use_mem_eff_path`` are deprecated
    and ignored in favour of ``config.mamba_state_dim``, ``config.mamba_head_dim``,
    ``config.mamba_num_groups`` (and ``config.mamba_num_heads``); ``dt_init`` and
    ``dt_scale`` are accepted but unused (megatron ignores them too).
    ``use_mem_eff_path`` only selects between two fused kernels in megatron; both
    compute the same function as this module's single path.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: TorchMambaMixerSubmodules,
        d_model: int,
        d_conv: int = 4,
        conv_init: Optional[float] = None,
        expand: float = 2,
        A_init_range: Tuple[float, float] = (1, 16),
        D_has_hdim: bool = False,
        rmsnorm: bool = True,
        norm_before_gate: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        bias: bool = False,
        conv_bias: bool = True,
        chunk_size: int = 128,
        layer_number: Optional[int] = None,
        use_mem_eff_path: Optional[bool] = None,
        d_state: Optional[int] = None,
        headdim: Optional[int] = None,
        ngroups: Optional[int] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        pp_layer_offset: int = 0,
    ) -> None:
        super().__init__(config)
        _refuse_unsupported(bias, norm_before_gate, dict(use_mem_eff_path=use_mem_eff_path, d_state=d_state,
                                                          headdim=headdim, ngroups=ngroups))
        if pg_collection is None:
            # megatron requires it; defaulting to the global groups is a convenience
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(["tp", "cp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        if pg_collection.cp.size() > 1:
            raise NotImplementedError("TorchMambaMixer does not implement context parallelism")

        self.d_model, self.d_conv, self.conv_init, self.expand = d_model, d_conv, conv_init, expand
        self.D_has_hdim, self.rmsnorm = D_has_hdim, rmsnorm
        self.norm_before_gate = norm_before_gate
        self.chunk_size, self.layer_number = chunk_size, layer_number
        self.pp_layer_offset = pp_layer_offset
        self.use_mem_eff_path = config.use_mamba_mem_eff_path
        self._set_sizes(config, expand, d_model)

        device = (
            torch.device("cpu")
            if config.use_cpu_initialization or not torch.cuda.is_available()
            else torch.device("cuda", torch.cuda.current_device())
        )
        # Creation order matters: it is the order megatron draws random numbers in.
        self.in_proj = self._projection(submodules.in_proj, self.d_model,
                                        self.d_inner * 2 + 2 * self.ngroups * self.d_state + self.nheads,  # z x B C dt
                                        column=True)
        self._build_conv(device, config.params_dtype, conv_bias)
        self._build_ssm_parameters(device, config.params_dtype, (dt_min, dt_max, dt_init_floor), A_init_range)
        if rmsnorm:
            self.norm = GatedRMSNorm(
                self.d_inner_local_tp,
                eps=1e-5,
                group_size=self.d_inner_local_tp // self.ngroups_local_tp,
                norm_before_gate=False,
                device=device,
                dtype=config.params_dtype,
            )
            mark_tensor_parallel(self.norm.weight)
        self.out_proj = self._projection(submodules.out_proj, self.d_inner, self.d_model, column=False)

    def _set_sizes(self, config: TransformerConfig, expand: float, d_model: int) -> None:
        """State, head and group sizes from the config, and this TP rank's share of them."""
        self.d_state = config.mamba_state_dim
        self.headdim = config.mamba_head_dim
        self.ngroups = config.mamba_num_groups
        for name in ("d_state", "headdim", "ngroups"):
            if not getattr(self, name) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if config.mamba_num_heads is not None:
            self.nheads = config.mamba_num_heads
            self.d_inner = self.nheads * self.headdim
        else:
            self.d_inner = int(expand * d_model)
            if self.d_inner % self.headdim != 0:
                raise ValueError(f"d_inner ({self.d_inner}) must be divisible by headdim")
            self.nheads = self.d_inner // self.headdim

        tp_size = self.tp_group.size()
        if self.nheads % tp_size or self.ngroups % tp_size or self.nheads % self.ngroups:
            raise ValueError(
                f"need nheads ({self.nheads}) and ngroups ({self.ngroups}) divisible by the TP "
                f"size ({tp_size}) and nheads divisible by ngroups"
            )
        self.nheads_local_tp = self.nheads // tp_size
        self.d_inner_local_tp = self.d_inner // tp_size
        self.ngroups_local_tp = self.ngroups // tp_size

    def _projection(self, layer: Any, rows_in: int, rows_out: int, *, column: bool) -> nn.Module:
        """in_proj (column-parallel, full output size; each rank keeps 1/tp of the rows) or
        out_proj (row-parallel), with megatron's arguments."""
        parallel = dict(gather_output=False) if column else dict(input_is_parallel=True)
        return build_module(
            layer,
            rows_in,
            rows_out,
            config=self.config,
            init_method=self.config.init_method if column else self.config.output_layer_init_method,
            bias=False,
            skip_bias_add=not column,
            is_expert=False,
            tp_comm_buffer_name="fc1" if column else "fc2",
            tp_group=self.tp_group,
            **parallel,
        )

    def _build_conv(self, device: torch.device, dtype: torch.dtype, conv_bias: bool) -> None:
        """Depthwise causal conv over ``x | B | C`` (weight ``[conv_dim, 1, d_conv]``), megatron's init."""
        conv_dim = self.d_inner_local_tp + 2 * self.ngroups_local_tp * self.d_state
        with rng_fork():
            self.conv1d = nn.Conv1d(
                conv_dim, conv_dim, kernel_size=self.d_conv, groups=conv_dim, padding=self.d_conv - 1,
                bias=conv_bias, device=device, dtype=dtype,
            )
            mark_tensor_parallel(self.conv1d.weight)
            mark_tensor_parallel(self.conv1d.bias)
            if self.config.perform_initialization:
                if self.conv_init is not None:
                    nn.init.uniform_(self.conv1d.weight, -self.conv_init, self.conv_init)
                else:
                    nn.init.kaiming_uniform_(self.conv1d.weight, a=math.sqrt(5))
        self.activation = "silu"
        self.act = nn.SiLU()

    def _build_ssm_parameters(self, device: torch.device, dtype: torch.dtype,
                              dt_range: Tuple[float, float, float], A_init_range: Tuple[float, float]) -> None:
        """``dt_bias``, ``A_log`` and ``D`` for this rank's heads (``A_log`` and ``D`` kept in float32)."""
        n_local = self.nheads_local_tp
        dt_min, dt_max, dt_init_floor = dt_range
        with rng_fork():
            self.dt_bias = nn.Parameter(init_dt_bias(n_local, dt_min, dt_max, dt_init_floor, device, dtype))
            mark_tensor_parallel(self.dt_bias)
            self.A_log = nn.Parameter(init_A_log(n_local, A_init_range, self.config.perform_initialization, device))
            mark_tensor_parallel(self.A_log)
        d_size = self.d_inner_local_tp if self.D_has_hdim else n_local
        self.D = nn.Parameter(torch.ones(d_size, device=device, dtype=torch.float32))
        mark_tensor_parallel(self.D)

    def forward(
        self,
        hidden_states: torch.Tensor,
        inference_context: Optional[Any] = None,
        *,
        inference_params: Optional[Any] = None,
        packed_seq_params: Optional[Any] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Map ``[s, b, d_model]`` to ``(out [s, b, d_model], out_bias)``.

        Like megatron, an inference context is only honoured in eval mode; in
        training mode it is ignored.
        """
        inference_context = deprecate_inference_params(inference_context, inference_params)
        if inference_context is not None and not self.training:
            raise NotImplementedError(
                "TorchMambaMixer implements only the training/prefill path without an "
                "inference cache; cached prefill and token-by-token decoding need megatron's "
                "MambaMixer (mamba_ssm + causal_conv1d on GPU)."
            )
        if packed_seq_params is not None:
            raise NotImplementedError(
                "TorchMambaMixer does not support packed sequences (packed_seq_params)"
            )

        zxbcdt, _ = self.in_proj(hidden_states)
        y = self._ssm(zxbcdt)
        return self.out_proj(y)

    def _ssm(self, zxbcdt: torch.Tensor) -> torch.Tensor:
        """Conv + scan + gated norm on this rank's slice: ``[s, b, in_proj_local]`` to
        ``[s, b, d_inner_local]`` (one autograd function, :mod:`.inner`)."""
        shape = InnerShape(
            nheads=self.nheads_local_tp,
            headdim=self.headdim,
            ngroups=self.ngroups_local_tp,
            d_state=self.d_state,
            chunk=min(self.chunk_size, SCAN_CHUNK_LIMIT),
            norm_eps=self.norm.eps if self.rmsnorm else 0.0,
            norm_group=self.norm.group_size if self.rmsnorm else None,
        )
        y = conv_scan_norm(
            zxbcdt.transpose(0, 1),  # [b, s, ...]: the scan wants batch first
            self.conv1d.weight,
            self.conv1d.bias,
            self.dt_bias,
            self.A_log,
            self.D,
            self.norm.weight if self.rmsnorm else None,
            shape,
        )
        return y.transpose(0, 1).contiguous()

    def mamba_state_shapes_per_request(self) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        """Per-request (conv state, ssm state) shapes, as megatron reports them."""
        return (self.conv1d.weight.shape[0], self.d_conv), (
            self.nheads_local_tp,
            self.headdim,
            self.d_state,
        )

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None
    ) -> dict:
        """Distributed-checkpoint layout identical to megatron's MambaMixer."""
        from .sharding import mamba_mixer_sharded_state_dict

        return mamba_mixer_sharded_state_dict(self, prefix, sharded_offsets, metadata)


def _refuse_unsupported(bias: bool, norm_before_gate: bool, deprecated: dict) -> None:
    """megatron's assertions, and its warnings for arguments it reads from the config instead."""
    for name, value in deprecated.items():
        if value is not None:
            warnings.warn(f"'{name}' is deprecated and ignored (read from TransformerConfig)", DeprecationWarning)
    if bias:
        raise ValueError("MambaMixer does not support bias=True (megatron asserts this)")
    if norm_before_gate:
        raise ValueError("MambaMixer requires norm_before_gate=False (megatron asserts this)")
