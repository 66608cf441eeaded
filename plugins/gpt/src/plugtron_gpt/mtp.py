"""Multi-token prediction (MTP) on megatron-core 0.16.1, made predictable.

Four things megatron leaves to its training loop are handled here:

* The MTP block spec. ``get_gpt_mtp_block_spec`` takes the MTP norms and the
  ``eh_proj`` linear from a backend provider, not from the layer spec: with
  the ``modelopt`` spec they would be megatron's local norm instead of the
  spec's, and with the ``local`` spec they match only because
  ``get_gpt_layer_local_spec`` rewrites a module global for RMSNorm.
  :class:`MatchingSpecProvider` hands out the main layers' own classes, so
  MTP really uses the chosen backend.
* The MTP loss. megatron folds its gradient into the backward pass of the main
  loss (``MTPLossAutoScaler``) and records its value, per MTP layer, in the
  process-wide ``MTPLossLoggingHelper.tracker``, accumulating over training
  forwards. That tracker is sized by the first model that writes to it, so a
  later model with more MTP layers fails with an IndexError; it is resized here.
* The MTP gradient scale. ``MTPLossAutoScaler`` multiplies the MTP gradient
  by a process-wide scale that megatron's pipeline schedules set after each
  forward (1 / micro-batches); a later forward outside a schedule would
  inherit a stale value. :func:`prepare_forward` resets it to 1 first (a
  schedule still overrides it after the forward).
* A forward without labels (inference) fails in ``GPTModel._postprocess``
  (``labels.clone()`` on ``None``); :func:`mtp_disabled` runs the main head
  only for such calls.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler, MTPLossLoggingHelper


def _last_layer_spec(layer_spec: Any) -> Any:
    """The spec of the decoder's last layer: MTP copies it (megatron's own rule)."""
    layers = getattr(layer_spec, "layer_specs", None)
    return layers[-1] if layers else layer_spec


class MatchingSpecProvider(LocalSpecProvider):
    """megatron's local backend, except that norms and column linears are the main layers' classes."""

    def __init__(self, layer_spec: Any) -> None:
        submodules = _last_layer_spec(layer_spec).submodules
        self._norm = submodules.input_layernorm
        if self._norm is IdentityOp:  # no pre-norms (norm_placement 'post'): the block's final norm class
            self._norm = getattr(layer_spec, "layer_norm", None) or IdentityOp
        attention = submodules.self_attention.submodules
        # GQA attention has linear_qkv; Multi-Latent Attention has no fused QKV, its
        # up projections are the layer's column-parallel linears.
        self._column = getattr(attention, "linear_qkv", None) or attention.linear_kv_up_proj

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> Any:
        if self._norm is IdentityOp:  # norm fused into the linear: no class to copy
            return super().layer_norm(rms_norm=rms_norm, for_qk=for_qk)
        return self._norm

    def column_parallel_linear(self) -> Any:
        return self._column


def mtp_block_spec(config: Any, layer_spec: Any, use_transformer_engine: bool, vp_stage: int | None) -> Any:
    """The MTP block spec for this stage, or ``None`` when this stage holds no MTP layer."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec, get_gpt_mtp_block_spec_for_backend

    if use_transformer_engine:
        return get_gpt_mtp_block_spec(config, layer_spec, use_transformer_engine=True, vp_stage=vp_stage)
    backend = MatchingSpecProvider(layer_spec)
    return get_gpt_mtp_block_spec_for_backend(config=config, spec=layer_spec, backend=backend, vp_stage=vp_stage)


def prepare_forward(num_layers: int) -> None:
    """Reset the MTP gradient scale to 1 and drop a tracker sized for another model.

    megatron re-creates the tracker with ``num_layers`` slots on the next record.
    """
    MTPLossAutoScaler.set_loss_scale(torch.ones(1))
    values = MTPLossLoggingHelper.tracker.get("values")
    if values is not None and values.shape[0] != num_layers:
        MTPLossLoggingHelper.tracker.clear()


def read_losses(reset: bool) -> torch.Tensor | None:
    """This rank's MTP losses (one per MTP layer), summed over the training forwards recorded."""
    values = MTPLossLoggingHelper.tracker.get("values")
    if values is None:
        return None
    losses = values.detach().clone()
    if reset:
        values.zero_()
    return losses


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers (FSDP2 keeps the class itself)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


@contextlib.contextmanager
def mtp_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Run the main head only: no MTP block, no MTP outputs in the hidden states."""
    inner = unwrap(model)
    if not getattr(inner, "mtp_process", False) and getattr(inner.config, "mtp_num_layers", None) is None:
        yield
        return
    saved = (inner.mtp_process, inner.config.mtp_num_layers)
    inner.mtp_process, inner.config.mtp_num_layers = False, None
    try:
        yield
    finally:
        inner.mtp_process, inner.config.mtp_num_layers = saved
