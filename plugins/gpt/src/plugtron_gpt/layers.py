"""The transformer layer of the ``torch`` spec: megatron's, plus the layer-level variants.

:class:`VariantTransformerLayer` is megatron's ``TransformerLayer`` with its
forward left as is; three things are added around it:

* ``post_attention_layernorm`` / ``post_mlp_layernorm`` (new submodules of
  :class:`VariantLayerSubmodules`, ``IdentityOp`` when absent) normalise the
  attention / MLP output, bias included, before the residual add: Gemma-2/3's
  post_attention_layernorm / post_feedforward_layernorm, Glm4's
  post_self_attn_layernorm / post_mlp_layernorm, Olmo2's pair (whose layers
  have no pre-norms: the spec leaves ``input_layernorm`` and
  ``pre_mlp_layernorm`` as ``IdentityOp``).
* ``residual_multiplier`` scales each branch output before the residual add:
  ``residual + (out + bias) * m`` (Granite).

  Both act inside megatron's bias-dropout-add step: the layer wraps its
  ``self_attn_bda`` / ``mlp_bda`` so megatron's forward, recomputation and
  dropout stay as they are. Under sequence parallelism the branch output is
  already the rank's sequence slice; the norms are per token, and
  :class:`~plugtron.runtime.cpu.TorchNorm` marks their weights for the TP
  gradient sum.
* ``rotary_base_local``: a windowed layer (megatron's
  ``is_layer_window_attention``) owns a RoPE module with that base and the
  same geometry (no scaling, no interpolation) and uses it instead of the
  model's (Gemma-3's sliding layers use ``rope_local_base_freq``). The
  model's RoPE tensor has one row per position of the whole sequence, so its
  length is the length to compute (context parallelism is refused).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Union

import torch
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.transformer.utils import is_layer_window_attention


@dataclass
class VariantLayerSubmodules(TransformerLayerSubmodules):
    """megatron's layer submodules plus the two post-branch norms."""

    post_attention_layernorm: Union[ModuleSpec, type] = IdentityOp
    post_mlp_layernorm: Union[ModuleSpec, type] = IdentityOp


class VariantTransformerLayer(TransformerLayer):
    def __init__(
        self,
        config: Any,
        submodules: TransformerLayerSubmodules,
        layer_number: int = 1,
        hidden_dropout: float | None = None,
        pg_collection: Any = None,
        vp_stage: int | None = None,
        residual_multiplier: float | None = None,
        rotary_base_local: float | None = None,
        rotary_percent: float = 1.0,
    ) -> None:
        super().__init__(config, submodules, layer_number, hidden_dropout, pg_collection, vp_stage)
        for name in ("post_attention_layernorm", "post_mlp_layernorm"):
            spec = getattr(submodules, name, IdentityOp)
            setattr(self, name, build_module(spec, config=self.config, hidden_size=self.config.hidden_size, eps=self.config.layernorm_epsilon))
        self.residual_multiplier = residual_multiplier
        self.self_attn_bda = _BranchEnd(self.self_attn_bda, self, "post_attention_layernorm")
        self.mlp_bda = _BranchEnd(self.mlp_bda, self, "post_mlp_layernorm")
        self.local_rotary_pos_emb = None
        if rotary_base_local is not None and is_layer_window_attention(config.window_size, config.window_attn_skip_freq, self.layer_number):
            from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

            self.local_rotary_pos_emb = RotaryEmbedding(
                kv_channels=config.kv_channels,
                rotary_percent=rotary_percent,
                rotary_interleaved=config.rotary_interleaved,
                rotary_base=rotary_base_local,
                use_cpu_initialization=config.use_cpu_initialization,
                cp_group=self.pg_collection.cp,
            )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """megatron's forward; a windowed layer with a local RoPE base swaps in its own RoPE tensor."""
        global_emb = kwargs.get("rotary_pos_emb")
        if self.local_rotary_pos_emb is not None and global_emb is not None:
            kwargs["rotary_pos_emb"] = self.local_rotary_pos_emb(global_emb.shape[0])
        return super().forward(*args, **kwargs)


class _BranchEnd:
    """megatron's bias-dropout-add factory, with the post-branch norm and residual multiplier applied first.

    megatron calls ``bda(training, fused)(output_with_bias, residual, dropout)``;
    this returns the same call with ``output_with_bias`` replaced by
    ``(norm(out + bias) * m, None)`` (each part only when configured). Holds
    the layer, not the norm, so the norm stays an ordinary submodule.
    """

    def __init__(self, bda: Callable[..., Any], layer: torch.nn.Module, norm: str) -> None:
        self.bda, self.norm = bda, norm
        self.layer_ref = layer

    def __call__(self, training: bool, fused: bool) -> Callable[..., torch.Tensor]:
        inner = self.bda(training, fused)
        norm = getattr(self.layer_ref, self.norm)
        multiplier = self.layer_ref.residual_multiplier
        if isinstance(norm, IdentityOp) and multiplier is None:
            return inner

        def finish(output_with_bias: tuple[torch.Tensor, torch.Tensor | None], residual: torch.Tensor, prob: float) -> torch.Tensor:
            out, bias = output_with_bias
            if bias is not None:
                out = out + bias
            if not isinstance(norm, IdentityOp):
                out = norm(out)
            if multiplier is not None:
                out = out * multiplier
            return inner((out, None), residual, prob)

        return finish
