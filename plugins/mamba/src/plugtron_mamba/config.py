"""``MambaModelConfig``: Mamba-2 and hybrid Mamba/attention/MLP models.

The layer sequence is megatron's *hybrid override pattern*: one character per
decoder layer, ``M`` a Mamba-2 mixer layer, ``*`` a self-attention layer, ``-``
an MLP layer, ``E`` a Mixture-of-Experts layer (megatron's ``MoELayer``: router,
routed experts, optional shared expert; needs ``num_moe_experts``), so
``"M*M-"`` is four layers. Without a pattern, megatron derives
one from ``hybrid_attention_ratio`` / ``hybrid_mlp_ratio`` (all ``M`` when both
are 0); :meth:`MambaModelConfig.layer_pattern` asks megatron's own allocator,
so both specs build the same sequence.

The Mamba-2 sizes that megatron keeps on its TransformerConfig are used from
there (``mamba_state_dim``, ``mamba_head_dim``, ``mamba_num_groups``,
``mamba_num_heads``); the ones megatron passes to the mixer as constructor
arguments are family fields here (``mamba_expand``, ``mamba_conv_kernel``,
``mamba_chunk_size``).

Rules :meth:`MambaModelConfig.validate` enforces before any tensor exists, and
why: an invalid pattern character or length would otherwise surface as a bare
``ValueError`` deep in construction; mixer sizes that do not divide (heads by
groups, heads/groups by TP) would fail inside the mixer; settings megatron's
Mamba stack does not build (explicit pipeline layouts, MTP) would be ignored or
misplaced silently; MoE fields without ``E`` layers would be ignored, and ``E``
layers without ``num_moe_experts`` cannot be built (:mod:`plugtron_mamba.moe_rules`).
"""

from __future__ import annotations

from typing import Any, ClassVar

from plugtron.config import model_config
from plugtron.config.language import LanguageModelConfig
from plugtron.errors import ConfigError

#: Pattern characters this family builds, with what they mean.
LAYER_SYMBOLS = {"M": "Mamba", "*": "attention", "-": "MLP", "E": "MoE"}
POSITION_EMBEDDINGS = ("none", "rope", "learned_absolute")
UNSUPPORTED = {
    "pipeline_model_parallel_layout": "megatron's Mamba stack splits layers evenly (or by first/last stage counts), not by layout",
    "account_for_embedding_in_pipeline_split": "megatron's Mamba stack does not count the embedding as a pipeline layer",
    "account_for_loss_in_pipeline_split": "megatron's Mamba stack does not count the loss as a pipeline layer",
    "multi_latent_attention": "the attention layers of this family are standard self-attention",
    "mtp_num_layers": "multi-token prediction is not built by the mamba family",
    "qk_layernorm": "megatron's Mamba stack spec has no query/key norms, so it would be ignored",
}


@model_config
class MambaModelConfig(LanguageModelConfig):
    """A Mamba-2 / hybrid model. TransformerConfig fields (num_layers,
    hidden_size, num_attention_heads, ffn_hidden_size, mamba_state_dim,
    mamba_head_dim, mamba_num_groups, mamba_num_heads ...) are set and read
    directly on this object."""

    family: ClassVar[str] = "mamba"
    unsupported: ClassVar[dict[str, str]] = UNSUPPORTED

    #: One character per layer: ``M`` Mamba, ``*`` attention, ``-`` MLP, ``E`` MoE. ``None``: from the ratios.
    hybrid_override_pattern: str | None = None
    hybrid_attention_ratio: float = 0.0
    hybrid_mlp_ratio: float = 0.0
    #: Mixer width is ``mamba_expand x hidden_size`` unless ``mamba_num_heads`` is set.
    mamba_expand: int = 2
    mamba_conv_kernel: int = 4
    #: Chunk length of the SSD scan: changes speed and rounding, never parameters.
    mamba_chunk_size: int = 128
    position_embedding_type: str = "none"
    rotary_percent: float = 1.0
    rotary_base: int = 10000
    seq_len_interpolation_factor: float | None = None

    def __init__(self, **kwargs: Any) -> None:
        # megatron scales the init of residual-writing projections by sqrt(2 x num_layers)
        # for transformer layers (two residual branches each) and by sqrt(num_layers) for
        # hybrid models (one branch per layer); megatron's Mamba training sets this flag.
        kwargs.setdefault("is_hybrid_model", True)
        super().__init__(**kwargs)

    # -- derived sizes -----------------------------------------------------
    def layer_pattern(self) -> str:
        """The layer sequence as a string, one symbol per layer (megatron's allocation)."""
        if self.hybrid_override_pattern is not None and not self.hybrid_attention_ratio and not self.hybrid_mlp_ratio:
            return self.hybrid_override_pattern
        from megatron.core.ssm.mamba_hybrid_layer_allocation import allocate_layers

        try:
            layers = allocate_layers(
                self._get("num_layers"), self.hybrid_attention_ratio, self.hybrid_mlp_ratio, self.hybrid_override_pattern
            )
        except (ValueError, AssertionError) as exc:
            raise ConfigError("hybrid_override_pattern", f"megatron's layer allocation rejects it: {exc}", config=type(self).__name__) from exc
        return "".join(layers)

    def mamba_sizes(self) -> dict[str, int]:
        """heads, head_dim, groups, state and inner width of every Mamba mixer (as the mixer derives them)."""
        head_dim = self._get("mamba_head_dim", 64)
        heads = self._get("mamba_num_heads")
        if heads is None:
            inner = self.mamba_expand * self._get("hidden_size")
            heads = inner // head_dim if head_dim else 0
        else:
            inner = heads * head_dim
        return {"heads": heads, "head_dim": head_dim, "groups": self._get("mamba_num_groups", 8),
                "state": self._get("mamba_state_dim", 128), "inner": inner}

    # -- validation --------------------------------------------------------
    def validate(self) -> None:
        super().validate()
        self._check_pattern()
        self._check_mamba()
        self._check_position_embedding()
        from plugtron_mamba.moe_rules import check_moe

        check_moe(self)

    def is_moe(self) -> bool:
        """Whether the model has Mixture-of-Experts (``E``) layers."""
        return bool(self._get("num_moe_experts"))

    def auto_sequence_parallel(self) -> bool:
        """megatron refuses MoE at TP > 1 without sequence parallelism: switched on when left unset
        (numerically the same model; never written into saved configs). An explicit false is refused."""
        tp = self._get("tensor_model_parallel_size", 1) or 1
        return tp > 1 and self.is_moe() and "sequence_parallel" not in self._tc_kwargs

    def megatron_kwargs(self) -> dict[str, Any]:
        kwargs = super().megatron_kwargs()
        if self.auto_sequence_parallel():
            kwargs["sequence_parallel"] = True
        return kwargs

    def _check_pattern(self) -> None:
        pattern, layers = self.hybrid_override_pattern, self._get("num_layers")
        for name in ("hybrid_attention_ratio", "hybrid_mlp_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                self._fail(name, f"must be in [0, 1], got {getattr(self, name)}")
        if self.hybrid_attention_ratio + self.hybrid_mlp_ratio > 1.0:
            self._fail("hybrid_attention_ratio", "hybrid_attention_ratio + hybrid_mlp_ratio must not exceed 1")
        if pattern is None:
            return
        if not isinstance(pattern, str) or not pattern:
            self._fail("hybrid_override_pattern", f"must be a non-empty string or null, got {pattern!r}")
        symbols = ", ".join(f"'{s}' ({what})" for s, what in LAYER_SYMBOLS.items())
        for position, char in enumerate(pattern):
            if char not in LAYER_SYMBOLS:
                self._fail("hybrid_override_pattern", f"character {char!r} at position {position} is not one of {symbols}")
        if len(pattern) != layers:
            self._fail("hybrid_override_pattern", f"has {len(pattern)} layers ({pattern!r}) but num_layers is {layers}; they must be equal")

    def _check_mamba(self) -> None:
        tp = self._get("tensor_model_parallel_size", 1) or 1
        for name in ("mamba_state_dim", "mamba_head_dim", "mamba_num_groups"):
            value = self._get(name, 1)
            if not isinstance(value, int) or value <= 0:
                self._fail(name, f"must be a positive integer, got {value!r}")
        for name in ("mamba_expand", "mamba_conv_kernel", "mamba_chunk_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                self._fail(name, f"must be a positive integer, got {getattr(self, name)!r}")
        if "M" not in self.layer_pattern():
            return
        sizes = self.mamba_sizes()
        heads, groups = sizes["heads"], sizes["groups"]
        if self._get("mamba_num_heads") is None and (self.mamba_expand * self._get("hidden_size")) % sizes["head_dim"]:
            self._fail("mamba_head_dim", f"must divide mamba_expand x hidden_size = {sizes['inner']}")
        if heads <= 0 or heads % groups:
            self._fail("mamba_num_groups", f"the {heads} Mamba heads must be a positive multiple of mamba_num_groups={groups}")
        if heads % tp or groups % tp:
            self._fail("mamba_num_groups", f"{heads} Mamba heads and {groups} groups must both be divisible by tensor_model_parallel_size={tp}")

    def _check_position_embedding(self) -> None:
        kind = self.position_embedding_type
        if kind not in POSITION_EMBEDDINGS:
            self._fail("position_embedding_type", f"must be one of {', '.join(POSITION_EMBEDDINGS)}, not {kind!r}")
        if kind == "rope":
            kv = self._get("kv_channels") or self._get("hidden_size") // self._get("num_attention_heads")
            dim = int(kv * self.rotary_percent)
            if not 0.0 < self.rotary_percent <= 1.0 or dim < 2 or dim % 2:
                self._fail("rotary_percent", f"must be in (0, 1] and give an even number of rotary channels >= 2, got {dim}")
            if self.rotary_base <= 0:
                self._fail("rotary_base", "must be positive")
        elif self.seq_len_interpolation_factor is not None:
            self._fail("seq_len_interpolation_factor", f"is used by rope only; megatron ignores it for {kind!r}")
        if self.seq_len_interpolation_factor is not None and self.seq_len_interpolation_factor < 1.0:
            self._fail("seq_len_interpolation_factor", "must be >= 1 (positions are divided by it)")
