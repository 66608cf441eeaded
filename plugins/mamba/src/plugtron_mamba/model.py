"""``MambaHybridModel``: the language model around a :class:`HybridStack`.

Same submodule names and the same ``forward`` contract as megatron's
``MambaModel`` (``embedding``, ``rotary_pos_emb``, ``decoder``,
``output_layer``; logits ``[b, s, v]`` without labels, per-token loss
``[b, s]`` with them), so plugtron's training step and megatron's pipeline
schedules drive it as they drive ``GPTModel``. It exists because
``MambaModel`` cannot be told its virtual pipeline stage: its base class
``LanguageModule`` needs ``vp_stage`` before it sets up tied embeddings, and the
decoder needs it to pick the stage's layers.

Only training and prefill-style forward passes are implemented (the
pure-PyTorch mixer keeps no inference cache).
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.spec_utils import ModuleSpec, build_module


class MambaHybridModel(LanguageModule):
    """Embedding -> hybrid stack -> output layer, one pipeline stage of it.

    ``stack_spec`` builds the decoder and is called with ``pre_process``,
    ``post_process``, ``vp_stage`` and ``pg_collection``; its own params carry
    the layer pattern (see :func:`plugtron_mamba.stack.hybrid_stack_spec`).
    """

    def __init__(
        self,
        config: Any,
        stack_spec: ModuleSpec,
        vocab_size: int,
        max_sequence_length: int,
        *,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: Optional[int] = None,
        parallel_output: bool = True,
        share_embeddings_and_output_weights: bool = False,
        position_embedding_type: str = "none",
        rotary_percent: float = 1.0,
        rotary_base: int = 10000,
        seq_len_interpolation_factor: Optional[float] = None,
        pg_collection: Any = None,
    ) -> None:
        super().__init__(config=config, pg_collection=pg_collection)
        self.vp_stage = vp_stage  # read by setup_embeddings_and_output_layer below
        self.vocab_size, self.max_sequence_length = vocab_size, max_sequence_length
        self.pre_process, self.post_process = pre_process, post_process
        self.parallel_output = parallel_output
        self.share_embeddings_and_output_weights = share_embeddings_and_output_weights
        self.position_embedding_type = position_embedding_type
        self.model_type = ModelType.encoder_or_decoder

        if pre_process:
            self.embedding = LanguageModelEmbedding(
                config=config, vocab_size=vocab_size, max_sequence_length=max_sequence_length,
                position_embedding_type=position_embedding_type, tp_group=self.pg_collection.tp,
            )
        if position_embedding_type == "rope":
            self.rotary_pos_emb = RotaryEmbedding(
                kv_channels=config.kv_channels, rotary_percent=rotary_percent,
                seq_len_interpolation_factor=seq_len_interpolation_factor, rotary_base=rotary_base,
                use_cpu_initialization=config.use_cpu_initialization, cp_group=self.pg_collection.cp,
            )
        self.decoder = build_module(
            stack_spec, config, pre_process=pre_process, post_process=post_process,
            vp_stage=vp_stage, pg_collection=self.pg_collection,
        )
        if post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size, vocab_size, config=config, init_method=config.init_method, bias=False,
                skip_bias_add=False, gather_output=not parallel_output,
                skip_weight_param_allocation=pre_process and share_embeddings_and_output_weights,
                tp_group=self.pg_collection.tp,
            )
        if pre_process or post_process:
            self.setup_embeddings_and_output_layer()

    def set_input_tensor(self, input_tensor: Any) -> None:
        """Called by the pipeline schedules with this stage's input (a one-element list)."""
        if not isinstance(input_tensor, list):
            input_tensor = [input_tensor]
        if len(input_tensor) != 1:
            raise ValueError(f"expected one input tensor per stage, got {len(input_tensor)}")
        self.decoder.set_input_tensor(input_tensor[0])

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        attention_mask: Optional[Tensor],
        decoder_input: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        inference_context: Any = None,
        runtime_gather_output: Optional[bool] = None,
        *,
        packed_seq_params: Any = None,
    ) -> Tensor:
        """Per-token loss ``[b, s]`` with ``labels``; logits ``[b, s, v]`` without; hidden states on non-last stages."""
        if inference_context is not None:
            raise NotImplementedError("MambaHybridModel has no inference cache (the pure-PyTorch mixer keeps none)")
        if decoder_input is None and self.pre_process:
            decoder_input = self.embedding(input_ids=input_ids, position_ids=position_ids)
        rotary_pos_emb = None
        if self.position_embedding_type == "rope":
            length = self.rotary_pos_emb.get_rotary_seq_len(None, self.decoder, decoder_input, self.config, packed_seq_params)
            rotary_pos_emb = self.rotary_pos_emb(length)
        hidden = self.decoder(
            hidden_states=decoder_input, attention_mask=attention_mask,
            rotary_pos_emb=rotary_pos_emb, packed_seq_params=packed_seq_params,
        )
        if not self.post_process:
            return hidden
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(hidden, weight=weight, runtime_gather_output=runtime_gather_output)
        if labels is None:
            return logits.transpose(0, 1).contiguous()  # [s, b, v] -> [b, s, v]
        return self.compute_language_model_loss(labels, logits)
