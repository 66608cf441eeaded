"""``GPTModelBuilder``: one GPT stage; everything else is the core pipeline's."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch

from plugtron.builder import LanguageModelBuilder
from plugtron_gpt.config import YARN_FIELDS
from plugtron_gpt.specs import stage_block_spec, uses_transformer_engine

if TYPE_CHECKING:
    from plugtron.layer_specs import SpecChoice
    from plugtron.manager import PlugtronPluginManager


class GPTModelBuilder(LanguageModelBuilder):
    _pm: "PlugtronPluginManager | None" = None

    def select_spec(self, pm: "PlugtronPluginManager") -> "SpecChoice":
        """Remember the manager (:meth:`layer_spec` asks its plugins for MoE replacements).

        With ``auto``, a spec that lacks an architecture variant the config
        uses is skipped like an unavailable one (:mod:`plugtron_gpt.features`);
        a named spec is refused by its factory instead.
        """
        self._pm = pm
        choice = super().select_spec(pm)
        from plugtron_gpt.features import unsupported

        if self.config.layer_spec != "auto" or not unsupported(self.config, choice.info.name):
            return choice
        from plugtron.layer_specs import SpecChoice, describe_specs

        skipped = []
        for info, available in describe_specs(pm, self.config.family):
            missing = unsupported(self.config, info.name)
            if available.ok and not missing:
                reason = f"auto: best available implementing the config ({available.reason}); skipped " + "; ".join(skipped)
                self.spec_choice = SpecChoice(info, reason)
                return self.spec_choice
            skipped.append(f"{info.name}: " + (f"lacks {missing[0][0]}" if missing else available.reason))
        return choice  # none fits: the chosen factory names the missing variant

    def layer_spec(self) -> Any:
        """The chosen factory's spec, with the MoE parts plugins replace (``plugtron_moe_submodules``)."""
        spec = super().layer_spec()
        if not self.config.is_moe() or self._pm is None:
            return spec
        from plugtron_gpt import moe_overrides

        replacements = self._pm.hooks.moe_submodules(self.config, self._pm.family(self.config.family))
        return moe_overrides.apply(spec, replacements, self.config)

    def _transformer_config(self) -> Any:
        """The live TransformerConfig, with the YaRN fields megatron reads from it with ``getattr``.

        They are set only for YaRN: attention applies YaRN's mscale whenever
        the config *has* ``yarn_rotary_scaling_factor``.
        """
        tc = self.config.transformer
        if self.config.position_embedding_type == "yarn" and not self.config.is_mla():
            for name in YARN_FIELDS:
                setattr(tc, name, getattr(self.config, name))
        return tc

    def mtp_block_spec(self, layer_spec: Any, vp_stage: int | None) -> Any:
        """The MTP block built from the chosen layer spec and backend (``None`` without MTP)."""
        if not self.config.mtp_num_layers:
            return None
        from plugtron_gpt.mtp import mtp_block_spec

        te = uses_transformer_engine(self.spec_choice.info.name)
        return mtp_block_spec(self.config.transformer, layer_spec, te, vp_stage)

    def build_stage(self, *, pre_process: bool, post_process: bool, vp_stage: int | None, pg_collection: Any) -> torch.nn.Module:
        cfg = self.config
        layer_spec = self.layer_spec()
        kwargs = self.language_model_kwargs(pre_process=pre_process, post_process=post_process, pg_collection=pg_collection)
        with self._construction():
            model = self._gpt_model(kwargs, layer_spec, vp_stage)
        from plugtron_gpt import model_hooks

        model_hooks.install(model, cfg)
        if cfg.is_mla():
            from plugtron_gpt import mla

            mla.finish_stage(model, cfg.transformer)
        return model

    def _construction(self) -> Any:
        """What megatron's constructors run under: YaRN MLA layers compute their caches once (:mod:`plugtron_gpt.mla`)."""
        import contextlib

        if not (self.config.is_mla() and self.config.position_embedding_type == "yarn"):
            return contextlib.nullcontext()
        from plugtron_gpt import mla

        return mla.yarn_caches_computed_once()

    def _gpt_model(self, kwargs: dict[str, Any], layer_spec: Any, vp_stage: int | None) -> torch.nn.Module:
        from megatron.core.models.gpt import GPTModel

        cfg = self.config
        return GPTModel(
            **dict(kwargs, config=self._transformer_config()),
            transformer_layer_spec=stage_block_spec(layer_spec, cfg, vp_stage),
            fp16_lm_cross_entropy=cfg.fp16_lm_cross_entropy,
            # MLA applies RoPE inside attention; GPTModel builds none for 'rope' with MLA
            # (with 'yarn' it would build one and pass it in, which MLA refuses).
            position_embedding_type="rope" if cfg.is_mla() else cfg.position_embedding_type,
            rotary_percent=cfg.rotary_percent,
            rotary_base=cfg.rotary_base,
            rope_scaling=cfg.rope_scaling,
            rope_scaling_factor=cfg.rope_scaling_factor,
            scatter_embedding_sequence_parallel=cfg.scatter_embedding_sequence_parallel,
            seq_len_interpolation_factor=cfg.seq_len_interpolation_factor,
            mtp_block_spec=self.mtp_block_spec(layer_spec, vp_stage),
            vp_stage=vp_stage,
        )

    def tp_row_blocks(self, name: str, param: Any) -> list[int] | None:
        """Gated MLPs keep ``[gate_r; up_r]`` per rank; routed and shared experts have their own sizes.

        Routed experts are named ``...experts.local_experts.{i}.linear_fc1.weight``
        (SequentialMLP) or ``...experts.linear_fc1.weight{i}`` (grouped MLPs).
        """
        if not self.config.gated_linear_unit or not re.search(r"linear_fc1\.(weight|bias)\d*$", name):
            return None
        if ".mlp.experts." in name:
            rows = self.config.moe_ffn_hidden_size
            return [rows, rows]
        if ".mlp.shared_experts." in name:
            rows = self.config.moe_shared_expert_intermediate_size
            return [rows, rows]
        return super().tp_row_blocks(name, param)

    def random_batch(self, batch_size: int, seq_length: int, seed: int = 0) -> dict[str, Any]:
        """The core's random batch; position_ids [3, b, s] for mrope."""
        batch = super().random_batch(batch_size, seq_length, seed)
        if self.config.position_embedding_type == "mrope":
            batch["position_ids"] = batch["position_ids"].unsqueeze(0).expand(3, -1, -1).contiguous()
        return batch

    def forward_step(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """Per-token loss [b, s] with labels, else logits [b, s, vocab].

        With MTP and labels in training mode, megatron also records the MTP
        losses (read them with :meth:`mtp_losses`) and adds their gradient,
        scaled by ``mtp_loss_scaling_factor / mtp_num_layers`` and averaged over
        tokens, to the backward pass of the returned loss: call
        ``loss.mean().backward()`` for the two to be weighted as megatron intends
        (its pipeline schedules, which call this too, then rescale both per micro-batch).
        Without labels the MTP block is skipped (megatron 0.16.1 cannot run it then).
        """
        from plugtron_gpt import mtp

        labels = batch.get("labels")
        kwargs = dict(input_ids=batch["tokens"], position_ids=batch["position_ids"], attention_mask=batch.get("attention_mask"))
        if labels is None:
            with mtp.mtp_disabled(model):
                return model(**kwargs)
        if self.config.mtp_num_layers:
            mtp.prepare_forward(self.config.mtp_num_layers)
        if self.config.is_moe():
            from plugtron_gpt import moe

            moe.prepare_forward()
        return model(**kwargs, labels=labels, loss_mask=batch.get("loss_mask"))

    def mtp_losses(self, reset: bool = True) -> torch.Tensor | None:
        """The MTP loss of each MTP layer (mean over tokens), summed over training forwards.

        Read from megatron's process-wide ``MTPLossLoggingHelper`` tracker on
        this rank, without any cross-rank reduction; ``reset`` zeroes it for the
        next step. ``None`` when the model has no MTP or nothing was recorded
        (megatron records only in training mode, with labels).
        """
        if not self.config.mtp_num_layers:
            return None
        from plugtron_gpt import mtp

        return mtp.read_losses(reset)
