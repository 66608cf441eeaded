"""The base class of every family's model config.

A family config is an attrs class with its own fields (vocab size, position
embedding ...) that also *is* a megatron-core ``TransformerConfig``: every
TransformerConfig field reads and writes through it (``cfg.num_layers = 4``).
It remembers the TransformerConfig keywords that were *set*, not the values
megatron derives from them (``ffn_hidden_size``, ``init_method`` ...), so
:meth:`finalize` can rerun megatron's derivation and a save/load round trip
reproduces the same object exactly.

Family configs are declared with :func:`model_config`::

    @model_config
    class ToyConfig(ModelConfig):
        family: ClassVar[str] = "toy"
        vocab_size: int = 128
"""

from __future__ import annotations

import difflib
import re
import functools
from typing import Any, Callable, ClassVar, TypeVar

import attrs

from plugtron.errors import ConfigError
from plugtron.records import resolve

C = TypeVar("C", bound=type)

#: The decorator for family configs: attrs without a generated ``__init__``,
#: so the base class can split TransformerConfig keywords from family fields.
model_config: Callable[[C], C] = attrs.define(init=False, slots=False, eq=False)


@functools.lru_cache(maxsize=None)
def transformer_fields(path: str) -> dict[str, Any]:
    """Init fields of the TransformerConfig class at ``path``: name -> type hint.

    ``path`` is a family's ``transformer_config_class`` (plugin code), never file data.
    """
    import dataclasses
    import typing

    cls = resolve(path)
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int = 1, *, pad: bool = True) -> int:
    """megatron's rule: round the vocab up to a multiple of ``divisible_by x tp``."""
    if not pad:
        return vocab_size
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def _suggest(name: str, candidates: Any) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


@model_config
class ModelConfig:
    """Family-independent fields; subclasses add their own with :func:`model_config`."""

    family: ClassVar[str] = ""
    #: Declared by the family's code (trusted), never read from a file: a
    #: ClassVar is neither an attrs field nor a TransformerConfig keyword, so a
    #: config file naming it is refused as an unknown field.
    transformer_config_class: ClassVar[str] = "megatron.core.transformer.transformer_config:TransformerConfig"

    #: Named layer spec (``te``, ``local``, ``torch`` ...) or ``auto``.
    layer_spec: str = "auto"

    def __init__(self, **kwargs: Any) -> None:
        own = attrs.fields_dict(type(self))
        tc_names = self.transformer_field_types()
        mine = {k: kwargs.pop(k) for k in list(kwargs) if k in own}
        for key in kwargs:
            if key not in tc_names:
                raise ConfigError(
                    key,
                    f"is neither a field of {type(self).__name__} nor of megatron's TransformerConfig"
                    + _suggest(key, list(own) + list(tc_names)),
                    config=type(self).__name__,
                )
        object.__setattr__(self, "_tc_kwargs", dict(kwargs))
        object.__setattr__(self, "_transformer", None)
        self.__attrs_init__(**mine)

    # -- TransformerConfig delegation -------------------------------------
    @classmethod
    def transformer_field_types(cls) -> dict[str, Any]:
        return transformer_fields(cls.transformer_config_class)

    @property
    def transformer_kwargs(self) -> dict[str, Any]:
        """The TransformerConfig keywords set so far (a copy)."""
        return dict(self._tc_kwargs)

    @property
    def transformer(self) -> Any:
        """The live megatron TransformerConfig, built on first use."""
        if self._transformer is None:
            object.__setattr__(self, "_transformer", self._make_transformer())
        return self._transformer

    def transformer_config_path(self) -> str:
        """Import path (``module:Class``) of the TransformerConfig class the live config is made of.

        ``transformer_config_class`` by default. A family whose class depends
        on a field (GPT: megatron's ``MLATransformerConfig`` only with
        ``multi_latent_attention``) overrides this, and :meth:`megatron_kwargs`,
        rather than :meth:`_make_transformer`, so that megatron's errors are
        mapped to the field they name in one place. It must return a constant
        of the family's code (a class attribute, a module constant), never a
        value read from a file.
        """
        return type(self).transformer_config_class

    def megatron_kwargs(self) -> dict[str, Any]:
        """The keywords megatron's config class receives: those set, plus what the family derives (a copy)."""
        return dict(self._tc_kwargs)

    def _make_transformer(self) -> Any:
        cls = resolve(self.transformer_config_path())
        kwargs = self.megatron_kwargs()
        try:
            return cls(**kwargs)
        except (ValueError, AssertionError, TypeError, NotImplementedError) as exc:
            mentioned = [k for k in kwargs if re.search(rf"\b{re.escape(k)}\b", str(exc))]
            field = max(mentioned, key=len) if mentioned else "transformer"
            raise ConfigError(field, f"megatron-core rejects it: {exc}", config=type(self).__name__) from exc

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self.transformer_field_types():
            return getattr(self.transformer, name)
        raise AttributeError(f"{type(self).__name__} has no field '{name}'" + _suggest(name, self.transformer_field_types()))

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_") or name in attrs.fields_dict(type(self)):
            object.__setattr__(self, name, value)
        elif name in self.transformer_field_types():
            self._tc_kwargs[name] = value
            if self._transformer is not None:
                setattr(self._transformer, name, value)
        else:
            raise ConfigError(name, "is not a config field" + _suggest(name, self.transformer_field_types()), config=type(self).__name__)

    def __eq__(self, other: object) -> bool:
        from plugtron.config.io import to_dict

        return type(other) is type(self) and to_dict(self) == to_dict(other)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        own = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in attrs.fields(type(self)))
        return f"{type(self).__name__}({own}, transformer={self._tc_kwargs!r})"

    # -- validation --------------------------------------------------------
    def finalize(self) -> "ModelConfig":
        """Check every rule once, before any tensor exists; rebuild the TransformerConfig.

        Raises :class:`ConfigError` naming the field and the rule.
        """
        self._validate_parallel()
        self.validate()
        if (self._get("pipeline_model_parallel_size", 1) or 1) > 1 and self._get("pipeline_dtype") is None:
            import torch  # pipeline p2p needs a dtype; megatron leaves it to the caller

            self._tc_kwargs["pipeline_dtype"] = self._get("params_dtype") or torch.float32
        object.__setattr__(self, "_transformer", self._make_transformer())
        return self

    def validate(self) -> None:
        """Family rules; subclasses extend it and raise :class:`ConfigError`."""

    def _get(self, name: str, default: Any = None) -> Any:
        return self._tc_kwargs.get(name, default)

    def _validate_parallel(self) -> None:
        name = type(self).__name__
        tp = self._get("tensor_model_parallel_size", 1) or 1
        pp = self._get("pipeline_model_parallel_size", 1) or 1
        vp = self._get("virtual_pipeline_model_parallel_size")
        for key in ("num_layers", "hidden_size", "num_attention_heads"):
            if not isinstance(self._get(key), int) or self._get(key) <= 0:
                raise ConfigError(key, "is required and must be a positive integer", config=name)
        heads = self._get("num_attention_heads")
        groups = self._get("num_query_groups") or heads
        if heads % tp:
            raise ConfigError("num_attention_heads", f"{heads} heads must be divisible by tensor_model_parallel_size={tp}", config=name)
        if groups % tp:
            raise ConfigError("num_query_groups", f"{groups} query groups must be divisible by tensor_model_parallel_size={tp}", config=name)
        if heads % groups:
            raise ConfigError("num_query_groups", f"num_attention_heads={heads} must be a multiple of num_query_groups={groups}", config=name)
        if vp is not None and pp < 2:
            raise ConfigError("virtual_pipeline_model_parallel_size", "needs pipeline_model_parallel_size >= 2", config=name)
        stages = pp * (vp or 1)
        layers = self._get("num_layers")
        uneven_ends = self._get("num_layers_in_first_pipeline_stage") or self._get("num_layers_in_last_pipeline_stage")
        if layers % stages and not (self._get("pipeline_model_parallel_layout") or uneven_ends):
            raise ConfigError(
                "num_layers",
                f"{layers} layers cannot be split evenly into pipeline_model_parallel_size x virtual stages = {stages}",
                config=name,
            )
