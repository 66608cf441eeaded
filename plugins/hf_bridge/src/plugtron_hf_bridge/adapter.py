"""The adapter protocol: what an architecture provides so the engine can convert it.

The conversion engine (:mod:`.importer`, :mod:`.exporter`, :mod:`.verify`)
knows nothing about particular architectures. It reads ``architectures[0]``
from an HF ``config.json`` and asks the plugin manager for
``pm.converter("hf", architecture)``; the :class:`~plugtron.ConverterInfo`
names an adapter by import path. A third party adds an architecture from its
own package by registering such a record (``plugtron_register_converters``)
pointing at an object (or a class, instantiated without arguments) that
satisfies :class:`HFAdapter`.

An adapter answers four questions:

* the plugtron config for an HF ``config.json`` dict, and back;
* the tensor table (:class:`~plugtron_hf_bridge.mappings.TensorMapping`) for a
  finalized config; mappings that also carry ``pieces`` are read shard by
  shard, the others are read whole and sliced;
* which HF tensors a checkpoint may contain that are deliberately unused;
* which transformers class ``plugtron verify`` compares against.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .errors import ConversionError

if TYPE_CHECKING:
    from plugtron.manager import PlugtronPluginManager

    from .mappings import TensorMapping

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


class GPTAdapter:
    """The built-in adapters: Llama, Mistral, Qwen2, Qwen3 and GPT-2 into the ``gpt`` family.

    Config translation and tensor tables live in :mod:`.hf_config` and
    :mod:`.mappings`; this class turns their plain field dicts into
    ``GPTModelConfig`` objects and back.
    """

    family = "gpt"

    def __init__(self, architecture: str) -> None:
        self.architecture = architecture
        self.hf_model_class = f"transformers:{architecture}"

    def __repr__(self) -> str:
        return f"GPTAdapter({self.architecture!r})"

    def config_from_hf(self, hf_config: dict[str, Any], *, source: str | None = None) -> Any:
        from .hf_config import to_megatron_fields

        return gpt_config_from_fields(to_megatron_fields(hf_config, self.architecture, source=source))

    def config_to_hf(self, config: Any, *, passthrough: dict[str, Any] | None = None) -> dict[str, Any]:
        from .hf_config import from_megatron_fields

        return from_megatron_fields(fields_from_gpt_config(config), self.architecture, passthrough=passthrough)

    def tensor_mappings(self, config: Any, *, te_fused_norms: bool = False) -> "list[TensorMapping]":
        from .mappings import mapping_for

        return mapping_for(self.architecture, fields_from_gpt_config(config), te_fused_norms,
                           padded_vocab_size=config.padded_vocab_size())

    def tolerated_unused(self, name: str, config: Any) -> bool:
        return tolerated_unused(name, bool(config.share_embeddings_and_output_weights))

    def describes(self, config: Any, hf_config: dict[str, Any]) -> bool:
        """Whether ``hf_config`` translates to exactly the model ``config`` holds.

        Why: the exporter then writes that config.json back as it was (only
        ``dtype`` updated) instead of regenerating it through transformers'
        config classes, which cost 1.5-3.5 s to import.
        """
        from .errors import ConversionError
        from .hf_config import _MEGATRON_MUST_BE_DEFAULT, to_megatron_fields

        try:
            wanted = to_megatron_fields(hf_config, self.architecture)
        except ConversionError:
            return False
        have = fields_from_gpt_config(config)
        return (all(k in have and have[k] == v for k, v in wanted.items())
                and all(have.get(k, d) == d for k, d in _MEGATRON_MUST_BE_DEFAULT.items()))


def tolerated_unused(name: str, tied: bool) -> bool:
    """The built-in tables' tolerated extras: a tied ``lm_head.weight``, recomputed buffers (``inv_freq`` ...)."""
    from .mappings import _BUFFER_SUFFIXES

    return (tied and name == "lm_head.weight") or name.endswith(_BUFFER_SUFFIXES)


LLAMA = GPTAdapter("LlamaForCausalLM")
MISTRAL = GPTAdapter("MistralForCausalLM")
QWEN2 = GPTAdapter("Qwen2ForCausalLM")
QWEN3 = GPTAdapter("Qwen3ForCausalLM")
GPT2 = GPTAdapter("GPT2LMHeadModel")

#: Settings every converted GPT model gets: CPU-safe construction, no dropout
#: (HF checkpoints are compared and exported in inference numerics).
_CONVERSION_DEFAULTS: dict[str, Any] = {"use_cpu_initialization": True, "hidden_dropout": 0.0, "attention_dropout": 0.0}
#: megatron's YaRN treats mscale=None/None exactly as its defaults 1.0/0.0 (concentration = mscale(factor)).
_YARN_NEUTRAL = (1.0, 0.0)


def gpt_config_from_fields(fields: dict[str, Any]) -> Any:
    """A GPTModelConfig from :func:`hf_config.to_megatron_fields` output."""
    from plugtron.records import resolve
    from plugtron_gpt.config import GPTModelConfig

    kwargs = {**_CONVERSION_DEFAULTS, **fields}
    kwargs["activation_func"] = resolve(kwargs.pop("activation"))
    if kwargs.get("position_embedding_type") == "yarn" and kwargs.get("yarn_mscale") is None:
        kwargs["yarn_mscale"], kwargs["yarn_mscale_all_dim"] = _YARN_NEUTRAL
    return GPTModelConfig(**kwargs)


_FIELDS = (
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels", "ffn_hidden_size",
    "layernorm_epsilon", "normalization", "gated_linear_unit", "add_bias_linear", "add_qkv_bias", "qk_layernorm",
    "vocab_size", "seq_length", "position_embedding_type", "share_embeddings_and_output_weights", "rotary_base",
    "rotary_percent", "rope_scaling", "rope_scaling_factor", "seq_len_interpolation_factor",
    "apply_residual_connection_post_layernorm", "layernorm_zero_centered_gamma", "rotary_interleaved",
    "num_moe_experts", "multi_latent_attention", "softmax_scale", "window_size", "apply_query_key_layer_scaling",
)
_YARN = ("yarn_rotary_scaling_factor", "yarn_original_max_position_embeddings", "yarn_beta_fast", "yarn_beta_slow",
         "yarn_mscale", "yarn_mscale_all_dim", "yarn_correction_range_round_to_int")


def fields_from_gpt_config(config: Any) -> dict[str, Any]:
    """The plain field dict :mod:`.hf_config` and :mod:`.mappings` work with."""
    from plugtron.records import import_path_of

    fields = {name: getattr(config, name) for name in _FIELDS}
    fields["activation"] = import_path_of(config.activation_func)
    if config.position_embedding_type == "yarn":
        fields.update({name: getattr(config, name) for name in _YARN})
        if (fields["yarn_mscale"], fields["yarn_mscale_all_dim"]) == _YARN_NEUTRAL:
            fields["yarn_mscale"] = fields["yarn_mscale_all_dim"] = None
    if fields["ffn_hidden_size"] is None:
        fields["ffn_hidden_size"] = 4 * fields["hidden_size"]
    return fields
