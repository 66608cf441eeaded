"""``ToyBuilder``: builds one pipeline stage of a toy model.

Only :meth:`build_stage` is required; stages, hooks, placement, precision and
wrapping are done by plugtron's shared pipeline. ``random_batch`` and
``forward_step`` let ``plugtron build --step`` run a training step.
"""

from __future__ import annotations

from typing import Any

import torch

from plugtron.builder import ModelBuilder


class ToyBuilder(ModelBuilder):
    def build_stage(self, *, pre_process: bool, post_process: bool, vp_stage: int | None, pg_collection: Any) -> torch.nn.Module:
        from megatron.core.models.gpt import GPTModel

        return GPTModel(
            config=self.config.transformer,
            transformer_layer_spec=self.layer_spec(),
            vocab_size=self.config.vocab_size,
            max_sequence_length=self.config.seq_length,
            pre_process=pre_process,
            post_process=post_process,
            vp_stage=vp_stage,
            pg_collection=pg_collection,
        )

    def random_batch(self, batch_size: int, seq_length: int, seed: int = 0) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, self.config.vocab_size, (batch_size, seq_length + 1), generator=gen)
        positions = torch.arange(seq_length).unsqueeze(0).expand(batch_size, -1)
        return {
            "tokens": tokens[:, :-1].contiguous(),
            "labels": tokens[:, 1:].contiguous(),
            "position_ids": positions.contiguous(),
        }

    def forward_step(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return model(
            input_ids=batch["tokens"],
            position_ids=batch["position_ids"],
            attention_mask=None,
            labels=batch.get("labels"),
        )
