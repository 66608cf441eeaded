"""``GPTModelConfig``: the GPT family's fields on top of megatron's TransformerConfig."""

from __future__ import annotations

from typing import ClassVar

from plugtron.config import ModelConfig, model_config
from plugtron.errors import ConfigError

POSITION_EMBEDDINGS = ("learned_absolute", "rope", "yarn", "mrope", "none")


@model_config
class GPTModelConfig(ModelConfig):
    """A GPT model. TransformerConfig fields (num_layers, hidden_size,
    num_query_groups, normalization, qk_layernorm, mtp_num_layers ...) are
    set and read directly on this object."""

    family: ClassVar[str] = "gpt"

    vocab_size: int = 0
    seq_length: int = 2048
    make_vocab_size_divisible_by: int = 128
    should_pad_vocab: bool = True
    position_embedding_type: str = "rope"
    rotary_percent: float = 1.0
    rotary_base: int = 10000
    rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    seq_len_interpolation_factor: float | None = None
    share_embeddings_and_output_weights: bool = False
    parallel_output: bool = True
    fp16_lm_cross_entropy: bool = False
    scatter_embedding_sequence_parallel: bool = True
    # YaRN (position_embedding_type="yarn"); megatron reads these off the config.
    yarn_rotary_scaling_factor: float = 1.0
    yarn_original_max_position_embeddings: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float = 1.0
    yarn_mscale_all_dim: float = 0.0
    yarn_correction_range_round_to_int: bool = True

    def padded_vocab_size(self) -> int:
        """Vocab rounded up to make_vocab_size_divisible_by x TP (megatron's rule)."""
        if not self.should_pad_vocab:
            return self.vocab_size
        multiple = self.make_vocab_size_divisible_by * (self._get("tensor_model_parallel_size", 1) or 1)
        return -(-self.vocab_size // multiple) * multiple

    def validate(self) -> None:
        name = type(self).__name__
        if self.vocab_size <= 0:
            raise ConfigError("vocab_size", "is required and must be positive", config=name)
        if self.position_embedding_type not in POSITION_EMBEDDINGS:
            raise ConfigError("position_embedding_type", f"must be one of {', '.join(POSITION_EMBEDDINGS)}", config=name)
        if not 0.0 < self.rotary_percent <= 1.0:
            raise ConfigError("rotary_percent", "must be in (0, 1]", config=name)
        if self.rope_scaling and self.position_embedding_type != "rope":
            raise ConfigError("rope_scaling", "Llama-3 scaling applies to position_embedding_type='rope' only", config=name)
        if self.rope_scaling and self.seq_len_interpolation_factor:
            raise ConfigError("seq_len_interpolation_factor", "cannot be combined with rope_scaling", config=name)
        if self.position_embedding_type == "mrope" and not self._get("mrope_section"):
            raise ConfigError("mrope_section", "is required for position_embedding_type='mrope'", config=name)
        if not self.should_pad_vocab and self.vocab_size % (self._get("tensor_model_parallel_size", 1) or 1):
            raise ConfigError("vocab_size", "must be divisible by tensor_model_parallel_size when should_pad_vocab is False", config=name)
        mtp = self._get("mtp_num_layers")
        if mtp is not None and mtp < 0:
            raise ConfigError("mtp_num_layers", "must be >= 0", config=name)
