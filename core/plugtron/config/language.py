"""``LanguageModelConfig``: what every token-in, logits-out family shares.

The vocabulary and its padding, the sequence length, tied embeddings, and the
rules that go with them live here once, for GPT, Mamba and any third-party
language-model family.
"""

from __future__ import annotations

from typing import ClassVar

from plugtron.config.base import ModelConfig, model_config, padded_vocab_size
from plugtron.errors import ConfigError


@model_config
class LanguageModelConfig(ModelConfig):
    """Subclass it for a language-model family; extend :meth:`validate` with ``super().validate()``."""

    #: Norm classes the family's layer specs build.
    normalizations: ClassVar[tuple[str, ...]] = ("LayerNorm", "RMSNorm")
    #: TransformerConfig switches the family does not build, with the reason (they would be ignored silently).
    unsupported: ClassVar[dict[str, str]] = {}

    #: Unpadded vocabulary; the builder pads it (see :meth:`padded_vocab_size`).
    vocab_size: int = 0
    seq_length: int = 2048
    make_vocab_size_divisible_by: int = 128
    should_pad_vocab: bool = True
    share_embeddings_and_output_weights: bool = False
    parallel_output: bool = True

    def padded_vocab_size(self) -> int:
        """Vocab rounded up to make_vocab_size_divisible_by x TP (megatron's rule)."""
        tp = self._get("tensor_model_parallel_size", 1) or 1
        return padded_vocab_size(self.vocab_size, self.make_vocab_size_divisible_by, tp, pad=self.should_pad_vocab)

    def _fail(self, field: str, rule: str) -> None:
        raise ConfigError(field, rule, config=type(self).__name__)

    def validate(self) -> None:
        self._check_vocab()
        self._check_layers()

    def _check_vocab(self) -> None:
        tp = self._get("tensor_model_parallel_size", 1) or 1
        if self.vocab_size <= 0:
            self._fail("vocab_size", "is required and must be positive")
        if self.seq_length <= 0:
            self._fail("seq_length", "must be positive")
        if self.make_vocab_size_divisible_by < 1:
            self._fail("make_vocab_size_divisible_by", "must be >= 1")
        if not self.should_pad_vocab and self.vocab_size % tp:
            self._fail("vocab_size", "must be divisible by tensor_model_parallel_size when should_pad_vocab is False")

    def _check_layers(self) -> None:
        normalization = self._get("normalization", "LayerNorm")
        if normalization not in self.normalizations:
            self._fail("normalization", f"must be one of {', '.join(self.normalizations)}, not {normalization!r}")
        for name, why in self.unsupported.items():
            if self._get(name):
                self._fail(name, why)
        activation = self._get("activation_func")
        if activation is not None and not callable(activation):
            self._fail("activation_func", f"must be a callable (an import path like 'torch.nn.functional:silu' in files), not {activation!r}")
