"""``HybridStack``: the decoder of a Mamba/hybrid model, for CPU and GPU.

It plays the role of megatron's ``MambaStack`` (same attribute names, so the
parameter names are ``decoder.layers.{i}.*`` and ``decoder.final_norm.*``) with
two differences that make it usable here:

* the final norm comes from the spec (``MambaStack`` hard-codes TE's norm);
* the layers of a pipeline stage are chosen with megatron's own
  ``get_transformer_layer_offset`` / ``get_num_layers_to_build``, which know
  virtual pipeline stages (``MambaStack`` refuses VP). These are the functions
  ``TransformerLayer`` uses for its own ``layer_number``, so Mamba, attention and
  MLP layers of a stage always agree on their global numbers.

MoE (``E``) layers are megatron's ``MoETransformerLayer`` (a TransformerLayer).
Attention (``*``) and MLP (``-``) layers are plain megatron ``TransformerLayer``
objects whose spec leaves out the other half (megatron's ``MLPLayer`` is the
same class without the ``vp_stage`` argument, which VP needs).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.ssm.mamba_block import MambaStackSubmodules
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer, get_transformer_layer_offset
from megatron.core.transformer.utils import sharded_state_dict_default
from megatron.core.utils import make_viewless_tensor


def stage_layers(config: Any, pattern: str, vp_stage: Optional[int], pp_rank: int) -> tuple[int, str]:
    """(global index of the stage's first layer, the stage's part of the pattern)."""
    offset = get_transformer_layer_offset(config, vp_stage, pp_rank)
    count = get_num_layers_to_build(config, vp_stage, pp_rank)
    return offset, pattern[offset : offset + count]


class HybridStack(MegatronModule):
    """The stage's layers in pattern order, then (last stage) the final norm.

    ``submodules`` is megatron's ``MambaStackSubmodules``; ``final_norm`` is a
    spec or class called as ``final_norm(config, hidden_size)``.
    """

    def __init__(
        self,
        config: Any,
        submodules: MambaStackSubmodules,
        *,
        pattern: str,
        final_norm: Any,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: Optional[int] = None,
        pg_collection: Any = None,
    ) -> None:
        super().__init__(config=config)
        if pg_collection is None:
            raise ValueError("HybridStack needs pg_collection")
        self.pre_process, self.post_process, self.vp_stage = pre_process, post_process, vp_stage
        self.tp_group = pg_collection.tp
        self.input_tensor: Optional[Tensor] = None  # set by the pipeline schedules on later stages
        self.pattern = pattern
        pp_rank = pg_collection.pp.rank()
        self.layer_offset, self.layer_type_list = stage_layers(config, pattern, vp_stage, pp_rank)
        self.layers = torch.nn.ModuleList(
            self._build_layer(kind, index, submodules, pg_collection) for index, kind in enumerate(self.layer_type_list)
        )
        self.num_layers_per_pipeline_rank = len(self.layers)
        if post_process:
            self.final_norm = build_module(final_norm, config, config.hidden_size)

    def _build_layer(self, kind: str, index: int, submodules: MambaStackSubmodules, pg_collection: Any) -> torch.nn.Module:
        if kind == "M":
            # megatron's MambaLayer takes its global number directly
            return build_module(
                submodules.mamba_layer, config=self.config, residual_in_fp32=False,
                layer_number=self.layer_offset + index + 1, pp_layer_offset=self.layer_offset, pg_collection=pg_collection,
            )
        spec = {"*": submodules.attention_layer, "-": submodules.mlp_layer, "E": submodules.moe_layer}.get(kind)
        if spec is None or (kind == "E" and spec is IdentityOp):
            raise ValueError(f"layer symbol {kind!r} is not one of 'M', '*', '-', 'E' (with a MoE layer spec)")
        # TransformerLayer adds the stage offset itself (from the same megatron function)
        return build_module(spec, config=self.config, layer_number=index + 1, vp_stage=self.vp_stage, pg_collection=pg_collection)

    def set_input_tensor(self, input_tensor: Tensor) -> None:
        """The pipeline schedules hand a later stage its input here, not through forward()."""
        self.input_tensor = input_tensor

    def forward(
        self,
        hidden_states: Optional[Tensor],
        attention_mask: Optional[Tensor],
        rotary_pos_emb: Optional[Tensor] = None,
        packed_seq_params: Any = None,
    ) -> Tensor:
        """``[s, b, h]`` in, ``[s, b, h]`` out (normalised on the last stage)."""
        if not self.pre_process:
            hidden_states = self.input_tensor
        for layer in self.layers:
            if isinstance(layer, TransformerLayer):
                hidden_states, _ = layer(
                    hidden_states=hidden_states, attention_mask=attention_mask,
                    rotary_pos_emb=rotary_pos_emb, packed_seq_params=packed_seq_params,
                )
            else:
                hidden_states = layer(hidden_states=hidden_states, attention_mask=attention_mask, packed_seq_params=packed_seq_params)
        if self.post_process:
            hidden_states = self.final_norm(hidden_states)
        # p2p sends need a tensor that owns its storage (megatron's rule for stage outputs)
        return make_viewless_tensor(inp=hidden_states, requires_grad=hidden_states.requires_grad, keep_graph=True)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None) -> dict:
        """Checkpoint keys use global layer numbers, so a checkpoint does not depend on PP/VP."""
        result: dict = {}
        for local, layer in enumerate(self.layers):
            local_prefix = f"{prefix}layers.{local}."
            layer_sd = layer.sharded_state_dict(local_prefix, [], metadata)
            replace_prefix_for_sharding(layer_sd, local_prefix, f"{prefix}layers.{layer.layer_number - 1}.")
            result.update(layer_sd)
        for name, module in self.named_children():
            if module is not self.layers:
                # tp_group explicitly: megatron 0.16.1 derives it only when metadata carries no dp_cp_group,
                # and otherwise marks the replicated final norm as main replica on every TP rank (save refused)
                result.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata,
                                                         tp_group=self.tp_group))
        return result


def hybrid_stack_spec(mamba_layer: Any, attention_layer: Any, mlp_layer: Any, final_norm: Any, pattern: str,
                      moe_layer: Any = None) -> ModuleSpec:
    """A ``HybridStack`` spec for one model; ``pattern`` travels in the spec's params."""
    layers = dict(mamba_layer=mamba_layer, attention_layer=attention_layer, mlp_layer=mlp_layer)
    if moe_layer is not None:
        layers["moe_layer"] = moe_layer
    return ModuleSpec(
        module=HybridStack,
        submodules=MambaStackSubmodules(**layers),
        params={"pattern": pattern, "final_norm": final_norm},
    )
