"""Known-wrong constructions of MoE and MLA models, for the tests that prove plugtron avoids them.

Each function is a layout-parity ``setup`` (see :mod:`plugtron.parity`): it
patches one safeguard away, in the ranks of the parity job, and returns the
function that puts it back. The parity job imports this module by name, so
the test puts this folder on ``PYTHONPATH``.
"""

from __future__ import annotations

from typing import Any, Callable


def _swap(module: Any, name: str, replacement: Any) -> Callable[[], None]:
    saved = getattr(module, name)
    setattr(module, name, replacement)
    return lambda: setattr(module, name, saved)


def ddp_without_expert_data_parallel(config: Any) -> Callable[[], None]:
    """megatron DDP as shipped: experts at EP=1 reduced over the dense data-parallel group."""
    from plugtron.pipeline import wrap

    return _swap(wrap, "reduce_experts_over_expert_data_parallel", lambda chunks: None)


def plain_without_expert_grad_sum(config: Any) -> Callable[[], None]:
    """Plain chunks without the expert-data-parallel gradient sum."""
    from plugtron import training

    return _swap(training, "_sync_expert_grads", lambda chunks: None)


def mla_column_parallel_down_projections(config: Any) -> Callable[[], None]:
    """megatron's local MLA spec: column-parallel q/kv down projections (sequence parallelism stays on)."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    from plugtron_gpt import specs

    return _swap(specs, "replicated_linear", lambda: ColumnParallelLinear)


def mla_without_sequence_parallel(config: Any) -> Callable[[], None]:
    """MLA at TP > 1 with sequence parallelism forced off (the config rule is switched off to build it)."""
    from plugtron_gpt import moe_rules

    config.sequence_parallel = False
    return _swap(moe_rules, "check_tensor_parallel", lambda cfg: None)


def fsdp2_default_expert_divide_factor(config: Any) -> Callable[[], None]:
    """FSDP2's default for the experts' units: divide by the size of the group they are reduced over (edp)."""
    from torch.distributed.fsdp import FSDPModule

    return _swap(FSDPModule, "set_gradient_divide_factor", lambda self, factor: None)
