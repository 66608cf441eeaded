"""``ToyConfig``: the toy family's own fields on top of megatron's TransformerConfig.

TransformerConfig keywords (``num_layers``, ``hidden_size``,
``num_attention_heads`` ...) are passed to the constructor and read back as
attributes; only what megatron does not know is declared here::

    cfg = ToyConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=256)
    cfg.finalize()
"""

from __future__ import annotations

from typing import ClassVar

from plugtron.config import ModelConfig, model_config
from plugtron.errors import ConfigError


@model_config
class ToyConfig(ModelConfig):
    family: ClassVar[str] = "toy"

    vocab_size: int = 256
    seq_length: int = 64

    def validate(self) -> None:
        name = type(self).__name__
        if self.vocab_size <= 0:
            raise ConfigError("vocab_size", "must be a positive integer", config=name)
        if self.seq_length <= 0:
            raise ConfigError("seq_length", "must be a positive integer", config=name)
