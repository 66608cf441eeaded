"""``MambaModelBuilder``: one stage of a Mamba/hybrid model; the rest is the core pipeline's.

* spec ``torch``: :class:`~plugtron_mamba.model.MambaHybridModel` (CPU and GPU,
  virtual pipeline stages supported);
* spec ``mamba_ssm``: megatron's own ``MambaModel`` with its TE/mamba_ssm stack
  (GPU only; written against megatron's API, not run on a GPU by this project;
  megatron's stack refuses virtual pipeline stages).

Both have the same parameter names, so weights move between them unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from plugtron.builder import LanguageModelBuilder
from plugtron.errors import PipelineError
from plugtron_mamba.specs import mixer_params


class MambaModelBuilder(LanguageModelBuilder):
    def _model_kwargs(self, pre_process: bool, post_process: bool, pg_collection: Any) -> dict[str, Any]:
        """The core's language-model keywords plus the position-embedding fields of this family's config."""
        cfg = self.config
        return dict(
            self.language_model_kwargs(pre_process=pre_process, post_process=post_process, pg_collection=pg_collection),
            position_embedding_type=cfg.position_embedding_type,
            rotary_percent=cfg.rotary_percent,
            rotary_base=cfg.rotary_base,
            seq_len_interpolation_factor=cfg.seq_len_interpolation_factor,
        )

    def build_stage(self, *, pre_process: bool, post_process: bool, vp_stage: int | None, pg_collection: Any) -> torch.nn.Module:
        spec = self.layer_spec()
        kwargs = self._model_kwargs(pre_process, post_process, pg_collection)
        if self.spec_choice is not None and self.spec_choice.info.name == "mamba_ssm":
            return self._megatron_model(spec, kwargs, vp_stage)
        from plugtron_mamba.model import MambaHybridModel

        return MambaHybridModel(stack_spec=spec, vp_stage=vp_stage, **kwargs)

    def _megatron_model(self, spec: Any, kwargs: dict[str, Any], vp_stage: int | None) -> torch.nn.Module:
        """megatron's MambaModel (GPU). Not run on a GPU by this project."""
        if vp_stage is not None:
            raise PipelineError("layer spec 'mamba_ssm' (megatron's MambaStack) does not support virtual pipeline stages; use layer_spec 'torch'")
        from megatron.core.models.mamba import MambaModel

        cfg = self.config
        return MambaModel(
            mamba_stack_spec=spec,
            hybrid_attention_ratio=cfg.hybrid_attention_ratio,
            hybrid_mlp_ratio=cfg.hybrid_mlp_ratio,
            hybrid_override_pattern=cfg.layer_pattern(),
            **kwargs,
        )

    # -- meta-device builds ------------------------------------------------
    def initialize_parameters(self, module: torch.nn.Module) -> None:
        """The core's megatron-style init, then each Mamba mixer's own recipe.

        The core default would give ``dt_bias`` zeros and ``A_log``/``D``/``conv1d``
        the linear-layer normal init; the mixer draws ``conv1d`` like a fresh
        ``nn.Conv1d`` (or uniform in +-conv_init), ``dt_bias`` as the inverse
        softplus of log-uniform steps, ``A_log`` as log U(A_init_range), and ``D`` = 1.
        Works for megatron's ``MambaMixer`` too (same attribute names). (MoE routers'
        expert biases are buffers, created as zeros by megatron: no init touches them.)
        """
        super().initialize_parameters(module)
        from plugtron_mamba.torch_impl.params import init_A_log, init_dt_bias, rng_fork

        init = mixer_params(self.config)
        for mixer in module.modules():
            if not all(hasattr(mixer, name) for name in ("A_log", "dt_bias", "D", "conv1d")):
                continue
            with torch.no_grad(), rng_fork():
                mixer.conv1d.reset_parameters()
                if init["conv_init"] is not None:
                    torch.nn.init.uniform_(mixer.conv1d.weight, -init["conv_init"], init["conv_init"])
                dt = init_dt_bias(mixer.dt_bias.numel(), init["dt_min"], init["dt_max"], init["dt_init_floor"], mixer.dt_bias.device, mixer.dt_bias.dtype)
                mixer.dt_bias.copy_(dt)
                mixer.A_log.copy_(init_A_log(mixer.A_log.numel(), init["A_init_range"], True, mixer.A_log.device))
                mixer.D.fill_(1.0)

    def fsdp_unit_types(self) -> tuple[type, ...]:
        """Whole layers of every kind: Mamba layers and (attention / MLP) transformer layers."""
        from megatron.core.ssm.mamba_layer import MambaLayer
        from megatron.core.transformer.transformer_layer import TransformerLayer

        return (MambaLayer, TransformerLayer)

    # -- training step -----------------------------------------------------

    def tp_row_blocks(self, name: str, param: Any) -> list[int] | None:
        """The mixer's fused in_proj/conv1d split block by block (see :mod:`plugtron_mamba.tp_layout`)."""
        from plugtron_mamba.tp_layout import row_blocks

        return row_blocks(name, self.config)
