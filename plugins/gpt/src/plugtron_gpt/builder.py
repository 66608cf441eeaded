"""``GPTModelBuilder``: one GPT stage; everything else is the core pipeline's."""

from __future__ import annotations

from typing import Any

import torch

from plugtron.builder import ModelBuilder
from plugtron_gpt.specs import uses_transformer_engine

_YARN_FIELDS = (
    "yarn_rotary_scaling_factor", "yarn_original_max_position_embeddings", "yarn_beta_fast",
    "yarn_beta_slow", "yarn_mscale", "yarn_mscale_all_dim", "yarn_correction_range_round_to_int",
)


class GPTModelBuilder(ModelBuilder):
    def _transformer_config(self) -> Any:
        tc = self.config.transformer
        if self.config.position_embedding_type == "yarn":
            for name in _YARN_FIELDS:  # megatron's GPTModel reads them with getattr
                setattr(tc, name, getattr(self.config, name))
        return tc

    def mtp_block_spec(self, layer_spec: Any, vp_stage: int | None) -> Any:
        if not self.config.mtp_num_layers:
            return None
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

        te = uses_transformer_engine(self.spec_choice.info.name)
        return get_gpt_mtp_block_spec(self.config.transformer, layer_spec, use_transformer_engine=te, vp_stage=vp_stage)

    def build_stage(self, *, pre_process: bool, post_process: bool, vp_stage: int | None, pg_collection: Any) -> torch.nn.Module:
        from megatron.core.models.gpt import GPTModel

        cfg = self.config
        layer_spec = self.layer_spec()
        return GPTModel(
            config=self._transformer_config(),
            transformer_layer_spec=layer_spec,
            vocab_size=cfg.padded_vocab_size(),
            max_sequence_length=cfg.seq_length,
            pre_process=pre_process,
            post_process=post_process,
            fp16_lm_cross_entropy=cfg.fp16_lm_cross_entropy,
            parallel_output=cfg.parallel_output,
            share_embeddings_and_output_weights=cfg.share_embeddings_and_output_weights,
            position_embedding_type=cfg.position_embedding_type,
            rotary_percent=cfg.rotary_percent,
            rotary_base=cfg.rotary_base,
            rope_scaling=cfg.rope_scaling,
            rope_scaling_factor=cfg.rope_scaling_factor,
            scatter_embedding_sequence_parallel=cfg.scatter_embedding_sequence_parallel,
            seq_len_interpolation_factor=cfg.seq_len_interpolation_factor,
            mtp_block_spec=self.mtp_block_spec(layer_spec, vp_stage),
            pg_collection=pg_collection,
            vp_stage=vp_stage,
        )

    def random_batch(self, batch_size: int, seq_length: int, seed: int = 0) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, self.config.vocab_size, (batch_size, seq_length + 1), generator=gen)
        positions = torch.arange(seq_length).unsqueeze(0).expand(batch_size, -1)
        if self.config.position_embedding_type == "mrope":
            positions = positions.unsqueeze(0).expand(3, -1, -1)
        return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(), "position_ids": positions.contiguous()}

    def forward_step(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return model(
            input_ids=batch["tokens"], position_ids=batch["position_ids"], attention_mask=None, labels=batch.get("labels")
        )
