"""One Hugging Face architecture of the GPT family, as data: :class:`HFArchitecture`.

An architecture module (``llama.py``, ``qwen2.py`` ...) builds one of these
from four things:

* ``schema``: the transformers config class's defaults and derivations
  (:class:`plugtron.conversion.ConfigSchema`), so reading needs no transformers;
* ``read``: ``config.json`` (through a :class:`~plugtron.conversion.ConfigReader`)
  -> megatron config fields, refusing what megatron cannot reproduce;
* ``write``: megatron fields -> keyword arguments of the transformers config
  class (export);
* ``table``: the tensor table (:class:`plugtron.conversion.Table`).

Variants are derived, not copied: ``LLAMA.derive(name=..., table=LLAMA.table.renamed(...))``.
:class:`~plugtron_gpt.hf.adapter.GPTAdapter` turns an architecture into what
the HF engine loads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from plugtron.conversion import ConfigReader, ConfigSchema, Table

Fields = dict[str, Any]


@dataclass(frozen=True)
class HFArchitecture:
    #: ``architectures[0]`` in ``config.json``, e.g. ``"LlamaForCausalLM"``.
    name: str
    #: ``model_type`` in ``config.json``; also identifies files without ``architectures``.
    model_type: str
    #: The transformers config class written on export, e.g. ``"LlamaConfig"``.
    config_class: str
    schema: ConfigSchema
    read: Callable[[ConfigReader], Fields]
    write: Callable[[Fields], dict[str, Any]]
    table: Table
    #: megatron fields this architecture can express beyond the plain decoder
    #: (``window_size`` ...); every other field of :data:`~plugtron_gpt.hf.adapter.SPECIAL_FIELDS`
    #: must be at its default to export.
    expresses: frozenset[str] = frozenset()
    #: The transformers model class ``plugtron verify`` compares against; defaults to ``transformers:<name>``.
    model_class: str | None = None

    def derive(self, **changes: Any) -> "HFArchitecture":
        """A variant: this architecture with some parts replaced (``name`` and ``model_type`` at least)."""
        return dataclasses.replace(self, **changes)

    @property
    def hf_model_class(self) -> str:
        return self.model_class or f"transformers:{self.name}"
