"""The adapter protocol: what an architecture provides so the engine can convert it.

The conversion engine (:mod:`.importer`, :mod:`.exporter`, :mod:`.verify`)
knows nothing about particular architectures. It reads ``architectures[0]``
from an HF ``config.json`` and asks the plugin manager for
``pm.converter("hf", architecture)``; the :class:`~plugtron.ConverterInfo`
names an adapter by import path. A third party adds an architecture from its
own package by registering such a record (``plugtron_register_converters``)
pointing at an object (or a class, instantiated without arguments) that
satisfies :class:`HFAdapter`.

The built-in architectures are the families' (``plugtron_gpt.hf``,
``plugtron_mamba.hf``), registered the same way: the engine has no
privileged list.

An adapter answers four questions:

* the plugtron config for an HF ``config.json`` dict, and back;
* the tensor table (:class:`~plugtron.conversion.TensorMapping`) for a
  finalized config; mappings that also carry ``pieces`` are read shard by
  shard, the others are read whole and sliced;
* which HF tensors a checkpoint may contain that are deliberately unused;
* which transformers class ``plugtron verify`` compares against.

Optional, used when present:

* ``model_type``: identifies configs that lack ``architectures``;
* ``torch_free_table(hf_config, source=..., names=...)`` -> ``(mappings, tolerated)``:
  the table straight from ``config.json`` and the checkpoint's tensor names without torch, so the launcher checks a
  checkpoint before any rank starts (else the ranks do the full plan);
* ``describes(config, hf_config)``: whether an exported model may keep the
  source ``config.json`` as it was.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .errors import ConversionError

if TYPE_CHECKING:
    from plugtron.manager import PlugtronPluginManager

    from plugtron.conversion import TensorMapping

FORMAT = "hf"
_REQUIRED = ("architecture", "family", "hf_model_class", "config_from_hf", "config_to_hf",
             "tensor_mappings", "tolerated_unused")


@runtime_checkable
class HFAdapter(Protocol):
    """What the HF engine needs from one architecture (see the module docstring)."""

    #: The ``architectures[0]`` value of the HF config, e.g. ``"LlamaForCausalLM"``.
    architecture: str
    #: The plugtron family the converted model belongs to, e.g. ``"gpt"``.
    family: str
    #: Import path of the transformers model class, e.g. ``"transformers:LlamaForCausalLM"``.
    hf_model_class: str

    def config_from_hf(self, hf_config: dict[str, Any], *, source: str | None = None) -> Any:
        """The family's ModelConfig for ``hf_config``; raise ConversionError for what cannot be reproduced."""

    def config_to_hf(self, config: Any, *, passthrough: dict[str, Any] | None = None) -> dict[str, Any]:
        """An HF config dict for ``config``; ``passthrough`` is the original HF config, if known."""

    def tensor_mappings(self, config: Any, *, te_fused_norms: bool = False) -> "list[TensorMapping]":
        """Every megatron tensor of the whole model and the HF tensors it is made from."""

    def tolerated_unused(self, name: str, config: Any) -> bool:
        """Whether HF tensor ``name`` may sit in a checkpoint without being used."""


def load_adapter(architecture: str, pm: "PlugtronPluginManager | None" = None) -> HFAdapter:
    """The adapter registered for ``architecture``; the engine finds adapters only this way."""
    from plugtron.manager import get_plugin_manager

    info = (pm or get_plugin_manager()).converter(FORMAT, architecture)
    try:
        obj = info.load_adapter()
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConversionError(f"adapter {info.adapter} for {architecture} (plugin {info.plugin}) cannot be loaded: {exc}") from exc
    adapter = obj() if isinstance(obj, type) else obj
    missing = [name for name in _REQUIRED if not hasattr(adapter, name)]
    if missing:
        raise ConversionError(
            f"adapter {info.adapter} for {architecture} (plugin {info.plugin}) lacks {', '.join(missing)}"
        )
    return adapter
