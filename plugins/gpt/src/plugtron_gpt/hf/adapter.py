"""What the HF engine loads for a GPT-family architecture: :class:`GPTAdapter`.

The engine (``plugtron-hf-bridge``) finds an adapter through the plugin
manager (``pm.converter("hf", architecture)``, registered by this family's
``plugtron_register_converters``) and never imports this package. The adapter
answers the engine's questions from an :class:`~.architecture.HFArchitecture`:
config translation both ways, the tensor table for a finalized config, which
tensors may sit unused in a checkpoint, which transformers class to verify
against. Everything here but :meth:`GPTAdapter.config_from_hf` runs without
torch, so a launcher checks a checkpoint before any rank starts
(:meth:`GPTAdapter.torch_free_table`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable

from plugtron.conversion import ConfigReader, UnsupportedConfigError, expand

from .architecture import Fields, HFArchitecture

if TYPE_CHECKING:
    from plugtron.conversion import TensorMapping

#: Tensors full or old HF checkpoints may contain that carry no parameters (recomputed buffers).
BUFFER_SUFFIXES = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")

#: megatron fields beyond the plain pre-norm decoder, each at its default. An architecture that
#: expresses one lists it in ``HFArchitecture.expresses``; for any other architecture a
#: non-default value cannot be written to HF and export refuses it by name.
SPECIAL_FIELDS: dict[str, Any] = {
    "apply_residual_connection_post_layernorm": False, "layernorm_zero_centered_gamma": False,
    "rotary_interleaved": False, "num_moe_experts": None, "multi_latent_attention": False,
    "softmax_scale": None, "window_size": None, "apply_query_key_layer_scaling": False,
    "embedding_multiplier": None, "residual_multiplier": None, "logits_divisor": None, "norm_placement": "pre", "qk_norm_scope": "head",
    "embedding_multiplier_cast": False, "attention_softcap": None, "final_logit_softcap": None, "rotary_base_local": None, "window_attn_skip_freq": None,
    "no_rope_freq": None, "mtp_num_layers": None,
}

_NORM_NAMES = {  # local spec vs transformer-engine fused spec
    False: {"in_w": "input_layernorm.weight", "in_b": "input_layernorm.bias",
            "mlp_w": "pre_mlp_layernorm.weight", "mlp_b": "pre_mlp_layernorm.bias"},
    True: {"in_w": "self_attention.linear_qkv.layer_norm_weight", "in_b": "self_attention.linear_qkv.layer_norm_bias",
           "mlp_w": "mlp.linear_fc1.layer_norm_weight", "mlp_b": "mlp.linear_fc1.layer_norm_bias"},
}


def symbols(f: Fields, padded_vocab: int) -> dict[str, int]:
    """The shape symbols of GPT tables (see :mod:`plugtron.conversion.table`) for megatron fields ``f``."""
    heads, hidden = f["num_attention_heads"], f["hidden_size"]
    d = f.get("kv_channels") or hidden // heads
    groups = f.get("num_query_groups") or heads
    return {"H": hidden, "V": f["vocab_size"], "Vp": padded_vocab, "D": d, "Q": heads * d, "KV": groups * d,
            "QKV": (heads + 2 * groups) * d, "Q3": 3 * heads * d, "F": f["ffn_hidden_size"], "F2": 2 * f["ffn_hidden_size"],
            "P": f.get("seq_length", 0), "G": groups, "NH": heads,
            "E": f.get("num_moe_experts") or 0, "FE": f.get("moe_ffn_hidden_size") or 0,
            "FS": f.get("moe_shared_expert_intermediate_size") or 0, **mla_symbols(f)}


def mla_symbols(f: Fields) -> dict[str, int]:
    """Multi-Latent Attention and MTP shape symbols (0 for models without them): ``QL`` / ``KVL`` the q / kv
    latent ranks, ``QUP`` = NH x (qk_head_dim + qk_pos_emb_head_dim) the query rows, ``KVD`` = KVL +
    qk_pos_emb_head_dim the kv down projection rows, ``KVUP`` = NH x (qk_head_dim + v_head_dim), ``VO`` =
    NH x v_head_dim, ``MTP`` the MTP layers, ``H2`` = 2 x H (an MTP ``eh_proj``'s input) (see :mod:`plugtron.conversion.table`)."""
    out = {"MTP": f.get("mtp_num_layers") or 0, "H2": 2 * f["hidden_size"]}
    if not f.get("multi_latent_attention"):
        return {**out, "QL": 0, "KVL": 0, "QUP": 0, "KVD": 0, "KVUP": 0, "VO": 0}
    heads, qk, rope, v = f["num_attention_heads"], f["qk_head_dim"], f["qk_pos_emb_head_dim"], f["v_head_dim"]
    return {**out, "QL": f.get("q_lora_rank") or 0, "KVL": f["kv_lora_rank"], "QUP": heads * (qk + rope),
            "KVD": f["kv_lora_rank"] + rope, "KVUP": heads * (qk + v), "VO": heads * v}


def layer_kinds(f: Fields) -> list[str]:
    """``"moe"`` or ``"dense"`` per layer, as the family's specs build them
    (:func:`plugtron_gpt.specs.moe_layer_pattern`); rules limited to a kind (``for_layers``) follow it."""
    from plugtron_gpt.specs import moe_layer_pattern

    pattern = moe_layer_pattern(f["num_layers"], f.get("num_moe_experts"), f.get("moe_layer_freq", 1))
    return ["moe" if p else "dense" for p in pattern]


class GPTAdapter:
    """HF <-> plugtron ``gpt`` family for one :class:`~.architecture.HFArchitecture`."""

    family = "gpt"

    def __init__(self, architecture: HFArchitecture, mtp_copies: tuple[tuple[str, str], ...] = (),
                 other_model_types: tuple[str, ...] = ()) -> None:
        #: ``model_type`` values of published files that use this architecture's class through their own
        #: remote code (Kimi-K2: ``kimi_k2`` with DeepSeek-V3's classes); accepted by :meth:`to_fields`.
        self.other_model_types = other_model_types
        #: ``(copy, source)`` HF names of tensors a checkpoint stores per MTP layer that megatron shares with the
        #: main model (``model.layers.{n}.embed_tokens.weight`` copies ``model.embed_tokens.weight``); ``{n}``
        #: is the MTP layer's index among the stored layers (see :meth:`hf_copies`).
        self.mtp_copies = mtp_copies
        self.spec = architecture
        self.architecture = architecture.name
        self.model_type = architecture.model_type
        self.hf_model_class = architecture.hf_model_class

    def __repr__(self) -> str:
        return f"GPTAdapter({self.architecture!r})"

    # -- config ------------------------------------------------------------------------
    def to_fields(self, hf_config: dict[str, Any], *, source: str | None = None) -> Fields:
        """megatron config fields equivalent to ``hf_config``; raises on anything not reproducible."""
        model_type = hf_config.get("model_type")
        if model_type is not None and model_type != self.spec.model_type and model_type not in self.other_model_types:
            raise UnsupportedConfigError("model_type", f"{model_type!r} does not match architecture {self.architecture}",
                                         source=source)
        reader = ConfigReader(hf_config, self.spec.schema, self.architecture, source)
        fields = self.spec.read(reader)
        reader.reject_leftovers()
        return fields

    def fields_to_hf(self, fields: Fields, passthrough: dict[str, Any] | None = None) -> dict[str, Any]:
        """An HF config dict (loadable with ``AutoConfig``) for megatron ``fields``.

        ``passthrough`` (typically the original HF config) contributes only its
        non-numeric keys such as token ids, which megatron fields do not carry.
        """
        import transformers

        from plugtron.conversion import NON_NUMERIC_KEYS

        self.check_expressible(fields)
        out = getattr(transformers, self.spec.config_class)(**self.spec.write(fields)).to_dict()
        for key, value in (passthrough or {}).items():
            if key in NON_NUMERIC_KEYS and key not in ("architectures", "model_type", "transformers_version"):
                out[key] = value
        out["architectures"] = [self.architecture]
        return out

    def check_expressible(self, fields: Fields) -> None:
        """Every special field this architecture cannot express at its default, the sizes present."""
        for key, default in SPECIAL_FIELDS.items():
            if key not in self.spec.expresses and fields.get(key, default) != default:
                raise UnsupportedConfigError(key, f"is {fields[key]!r}; {self.architecture} cannot express anything but {default!r}")
        for key in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_length"):
            if fields.get(key) is None:
                raise UnsupportedConfigError(key, "required to build an HF config but missing")

    def config_from_hf(self, hf_config: dict[str, Any], *, source: str | None = None) -> Any:
        from .fields import gpt_config_from_fields

        return gpt_config_from_fields(self.to_fields(hf_config, source=source))

    def config_to_hf(self, config: Any, *, passthrough: dict[str, Any] | None = None) -> dict[str, Any]:
        from .fields import fields_from_gpt_config

        return self.fields_to_hf(fields_from_gpt_config(config), passthrough)

    def describes(self, config: Any, hf_config: dict[str, Any]) -> bool:
        """Whether ``hf_config`` translates to exactly the model ``config`` holds.

        Why: the exporter then writes that config.json back as it was (only
        ``dtype`` updated) instead of regenerating it through transformers'
        config classes, which cost 1.5-3.5 s to import.
        """
        from plugtron.conversion import ConversionError

        from .fields import fields_from_gpt_config

        try:
            wanted = self.to_fields(hf_config)
        except ConversionError:
            return False
        have = fields_from_gpt_config(config)
        return (all(k in have and have[k] == v for k, v in wanted.items())
                and all(have.get(k, d) == d for k, d in SPECIAL_FIELDS.items() if k not in wanted))

    # -- tensors -----------------------------------------------------------------------
    def mappings(self, fields: Fields, *, te_fused_norms: bool = False,
                 padded_vocab_size: int | None = None) -> "list[TensorMapping]":
        """The tensor table expanded for megatron ``fields`` (no torch needed)."""
        from plugtron.conversion import MappingError

        for key in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "ffn_hidden_size"):
            if fields.get(key) is None:
                raise MappingError(self.architecture, f"config field '{key}' is required to build the tensor table")
        sym = symbols(fields, padded_vocab_size or fields["vocab_size"])
        return expand(self.spec.table, fields, sym, fields["num_layers"], _NORM_NAMES[bool(te_fused_norms)],
                      layer_kinds(fields))

    def tensor_mappings(self, config: Any, *, te_fused_norms: bool = False) -> "list[TensorMapping]":
        from .fields import fields_from_gpt_config

        return self.mappings(fields_from_gpt_config(config), te_fused_norms=te_fused_norms,
                             padded_vocab_size=config.padded_vocab_size())

    def tolerated_unused(self, name: str, config: Any) -> bool:
        return (tolerated_unused(name, bool(config.share_embeddings_and_output_weights))
                or (bool(self.mtp_copies) and name in dict(self.hf_copies(config))))

    def stored_mtp_layers(self, names: Iterable[str], config: Any) -> int:
        """How many MTP layers a checkpoint stores after the decoder's (``model.layers.{num_layers + m}.*``).

        The engine sizes ``mtp_num_layers`` with this (default: as many as stored): transformers
        writes ``num_nextn_predict_layers: 1`` into checkpoints it saves without them, so the config
        cannot tell. 0 for architectures without MTP layers (no ``mtp_copies``).
        """
        return self._stored_mtp(names, config.num_layers)

    def _stored_mtp(self, names: Iterable[str], num_layers: int) -> int:
        if not self.mtp_copies:
            return 0
        stored = {int(part[2]) for part in (n.split(".") for n in names)
                  if len(part) > 3 and part[:2] == ["model", "layers"] and part[2].isdigit()}
        count = 0
        while num_layers + count in stored:
            count += 1
        return count

    def hf_copies(self, config: Any) -> list[tuple[str, str]]:
        """``(copy, source)`` for each tensor the HF checkpoint of ``config`` stores twice.

        megatron's MTP layers reuse the model's embedding and output layer; published
        DeepSeek-V3 / GLM-4.5 checkpoints store a copy per MTP layer. Import leaves the
        copies unread (tolerated); export writes each as its source's bytes.
        """
        return self._copies(config.num_layers, getattr(config, "mtp_num_layers", None) or 0,
                            bool(config.share_embeddings_and_output_weights))

    def _copies(self, layers: int, mtp: int, tied: bool) -> list[tuple[str, str]]:
        return [(copy.format(n=layers + m), "model.embed_tokens.weight" if tied and source == "lm_head.weight" else source)
                for m in range(mtp) for copy, source in self.mtp_copies]

    def torch_free_table(self, hf_config: dict[str, Any], *, source: str | None = None,
                         names: Iterable[str] = ()) -> "tuple[list[TensorMapping], Callable[[str], bool]]":
        """The table and the tolerated-unused test straight from ``config.json`` and the checkpoint's tensor
        ``names``, without torch: MTP layers sized from the names as :meth:`stored_mtp_layers` sizes them
        for the full plan. The launcher checks a checkpoint with these before any rank imports torch.
        """
        fields = self.to_fields(hf_config, source=source)
        if fields.get("mtp_num_layers") is None:
            fields["mtp_num_layers"] = self._stored_mtp(names, fields["num_layers"]) or None
        tied = bool(fields["share_embeddings_and_output_weights"])
        copies = dict(self._copies(fields["num_layers"], fields["mtp_num_layers"] or 0, tied))
        return self.mappings(fields), lambda name: tolerated_unused(name, tied) or name in copies


def tolerated_unused(name: str, tied: bool) -> bool:
    """A tied model's ``lm_head.weight`` (full state dicts keep it) and recomputed buffers (``inv_freq`` ...)."""
    return (tied and name == "lm_head.weight") or name.endswith(BUFFER_SUFFIXES)
