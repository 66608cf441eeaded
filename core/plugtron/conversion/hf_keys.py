"""Reading a Hugging Face ``config.json`` strictly: every key understood, or refused by name.

A config key that changes the model's numbers but is silently ignored gives
a converted model that loads, runs and is subtly wrong. So an architecture
reads its keys through a :class:`ConfigReader`, which records each key read;
what is left over must be on :data:`NON_NUMERIC_KEYS` (ids, bookkeeping,
generation settings, dropout), on the architecture's own non-numeric list,
or at a value listed as harmless, else :meth:`ConfigReader.reject_leftovers`
raises :class:`UnsupportedConfigError` naming the key.

Missing keys take the defaults of the transformers config class, exactly as
``AutoConfig`` would; an architecture keeps them as data
(:class:`ConfigSchema`) so reading a config never imports transformers
(importing a config class costs 1.5-3.5 s). Values are checked against the
types transformers' strict validation enforces (an ``int`` field refuses
``64.0`` and ``True``, a ``float`` field refuses ``1``).

This is HF-format vocabulary, in the core because the families' architecture
modules and the HF engine both use it, and plugins never import each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .errors import UnsupportedConfigError

#: HF keys known not to change a causal LM's forward numbers (ids, bookkeeping, generation, dropout).
NON_NUMERIC_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "_name_or_path", "dtype", "torch_dtype",
    "use_cache", "initializer_range", "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id",
    "sep_token_id", "decoder_start_token_id", "output_hidden_states", "output_attentions", "return_dict",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "id2label", "label2id", "problem_type",
    "tokenizer_class", "prefix", "task_specific_params", "finetuning_task", "torchscript", "tie_encoder_decoder",
    "cross_attention_hidden_size", "_attn_implementation", "_commit_hash", "num_labels",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
})

INT, OPT_INT, FLOAT, OPT_FLOAT, BOOL, STR = (
    "an integer", "an integer or null", "a float", "a float or null", "true or false", "a string")

#: The type transformers declares for keys many architectures share (an architecture may override).
COMMON_TYPES: dict[str, str] = {
    **dict.fromkeys(("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings", "max_window_layers", "n_positions", "n_embd", "n_layer", "n_head"),
                    INT),
    **dict.fromkeys(("num_key_value_heads", "head_dim", "sliding_window", "n_inner"), OPT_INT),
    **dict.fromkeys(("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps", "norm_eps"), FLOAT),
    **dict.fromkeys(("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window", "scale_attn_weights",
                     "scale_attn_by_inverse_layer_idx", "add_cross_attention"), BOOL),
    **dict.fromkeys(("hidden_act", "activation_function", "hidden_activation"), STR),
}


def type_ok(value: Any, kind: str) -> bool:
    """Whether ``value`` passes transformers' strict check for a key of type ``kind``."""
    if kind in (OPT_INT, OPT_FLOAT) and value is None:
        return True
    if kind in (INT, OPT_INT):
        return isinstance(value, int) and not isinstance(value, bool)
    if kind in (FLOAT, OPT_FLOAT):
        return isinstance(value, float)
    if kind == BOOL:
        return isinstance(value, bool)
    return isinstance(value, str)


@dataclass(frozen=True)
class ConfigSchema:
    """What one transformers config class does with a ``config.json`` (as data, no transformers import).

    ``defaults``: the class defaults of every key the converter reads.
    ``types``: per-key types beyond :data:`COMMON_TYPES` (or differing from them).
    ``derive``: fills values the class computes when absent (``head_dim`` ...), in place;
    raises :class:`UnsupportedConfigError` for what the class itself would refuse.
    ``non_numeric``: keys of this class that do not change the forward numbers.
    ``harmless_at``: keys published files carry at a value that changes nothing;
    any other value (type included: ``0`` is not ``false``) is refused by name.
    """

    defaults: Mapping[str, Any]
    types: Mapping[str, str] = field(default_factory=dict)
    derive: Callable[[dict[str, Any]], None] | None = None
    non_numeric: frozenset[str] = frozenset()
    harmless_at: Mapping[str, Any] = field(default_factory=dict)

    def resolve(self, cfg: Mapping[str, Any], source: str | None = None) -> dict[str, Any]:
        """``cfg`` with defaults filled in, derived values computed and types checked."""
        values = {**self.defaults, **cfg}
        types = {**COMMON_TYPES, **self.types}
        for key in self.defaults:
            kind = types.get(key)
            if kind is not None and not type_ok(values[key], kind):
                raise UnsupportedConfigError(key, f"must be {kind}, not {values[key]!r:.80}", source=source)
        for key in ("num_attention_heads", "n_head"):
            if values.get(key) == 0:
                raise UnsupportedConfigError(key, "must be positive", source=source)
        if self.derive is not None:
            try:
                self.derive(values)
            except UnsupportedConfigError as error:  # derivations do not know the file's name
                raise UnsupportedConfigError(error.field, error.problem, source=source) from None
        return values


class ConfigReader:
    """Reads one ``config.json`` through its schema, recording every key it consumed."""

    def __init__(self, cfg: Mapping[str, Any], schema: ConfigSchema, architecture: str, source: str | None) -> None:
        self.cfg, self.schema, self.architecture, self.source = cfg, schema, architecture, source
        self.used: set[str] = set()
        self.values = schema.resolve(cfg, source)

    def raw(self, key: str) -> Any:
        """The value in the file, or None when absent (no default)."""
        self.used.add(key)
        return self.cfg.get(key)

    def get(self, key: str) -> Any:
        """The value as transformers resolves it (file value, else class default or derived)."""
        self.used.add(key)
        return self.values.get(key)

    def mark(self, *keys: str) -> None:
        """Record keys as understood without reading them (their effect is checked elsewhere)."""
        self.used.update(keys)

    def fail(self, key: str, problem: str) -> UnsupportedConfigError:
        return UnsupportedConfigError(key, problem, source=self.source)

    def require(self, key: str, allowed: tuple[Any, ...], why: str) -> Any:
        """The resolved value of ``key`` if it is one of ``allowed``, else an error saying ``why``."""
        value = self.get(key)
        if not any(type(value) is type(a) and value == a for a in allowed):
            raise self.fail(key, f"is {value!r}; only {list(allowed)} is supported ({why})")
        return value

    def reject_leftovers(self) -> None:
        if self.raw("pruned_heads"):
            raise self.fail("pruned_heads", "pruned attention heads are not supported")
        allowed = NON_NUMERIC_KEYS | self.schema.non_numeric | self.used
        for key in sorted(set(self.cfg) - allowed):
            if key not in self.schema.harmless_at:
                raise self.fail(key, f"unknown to the {self.architecture} converter and may change the model's "
                                     "numbers; refusing to guess")
            value, expected = self.cfg[key], self.schema.harmless_at[key]
            if type(value) is not type(expected) or value != expected:
                raise self.fail(key, f"is {value!r}; the {self.architecture} converter supports only {expected!r}, "
                                     "the value that leaves the model's numbers unchanged")
