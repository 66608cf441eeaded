"""``GPTModelConfig``: the GPT family's fields on top of megatron's TransformerConfig.

The family fields are the ``GPTModel`` constructor arguments megatron does not
keep on its TransformerConfig (vocab, position embedding, RoPE variants), plus
the YaRN knobs that megatron reads off the config with ``getattr``. Everything
else (num_layers, num_query_groups, normalization, qk_layernorm, gated linear
units, biases, mtp_num_layers, mtp_loss_scaling_factor, mrope_section ...) is a
TransformerConfig field and is set and read directly on this object.

Which settings :meth:`GPTModelConfig.validate` rejects, and why:

* A switch that only modifies a position embedding the model does not use
  (``rope_scaling``, a non-default ``rope_scaling_factor``,
  ``seq_len_interpolation_factor``, any non-default ``yarn_*`` field,
  ``mrope_section``) is an error: megatron would ignore it silently, and a
  silently dropped RoPE scaling is a wrong model that still trains.
* The rotary geometry fields every config carries (``rotary_base``,
  ``rotary_percent``, ``rotary_interleaved``) are accepted and ignored with
  ``learned_absolute`` and ``none``: they have no effect there and a converter
  may fill them generically.
* Settings megatron accepts but computes wrongly or fails on only at the first
  forward pass (odd rotary dimension, ``rotary_percent`` with YaRN,
  interleaved YaRN or mrope, an ``mrope_section`` that does not cover the rotary
  dimension) are rejected before any tensor exists.

Architecture variants (Gemma, Granite, Olmo2, Glm4 ...: soft-capping, sliding
windows, post-norms, multipliers, full-width q/k norms, a local RoPE base) are
family fields plus megatron's ``window_size``, ``window_attn_skip_freq``,
``layernorm_zero_centered_gamma`` and ``softmax_scale``; their semantics and
rules are in :mod:`plugtron_gpt.variant_rules`, which layer specs build them in
:mod:`plugtron_gpt.features`. With ``qk_norm_scope: full`` the live megatron
config carries ``qk_layernorm=False`` (see :attr:`GPTModelConfig.qk_layernorm`).

Mixture-of-Experts and Multi-Latent Attention (the rules are in
:mod:`plugtron_gpt.moe_rules`, with the reason of each):

* MoE and expert-parallel fields are megatron's own TransformerConfig fields
  (``num_moe_experts``, ``moe_router_topk``, ``expert_model_parallel_size`` ...).
* ``multi_latent_attention: true`` makes the live config megatron's
  ``MLATransformerConfig`` (``q_lora_rank``, ``kv_lora_rank``,
  ``qk_head_dim``, ``qk_pos_emb_head_dim``, ``v_head_dim``). Its RoPE is
  configured with the family's own fields, as for every other GPT:
  ``position_embedding_type`` (``rope`` or ``yarn``), ``rotary_base``,
  ``rotary_percent`` and the ``yarn_*`` fields are copied into megatron's
  ``rope_type``, ``rotary_scaling_factor``, ``mscale`` ... which are therefore
  refused when set directly (two places for one setting would disagree).
* Tensor parallelism with MoE or MLA needs sequence parallelism (megatron
  refuses MoE without it; MLA without it gives wrong gradients). When
  ``sequence_parallel`` is left unset it is switched on for TP > 1, with a
  :class:`SequenceParallelNote` warning, and never written into the saved
  config; an explicit ``sequence_parallel: false`` is refused.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from plugtron.config import model_config
from plugtron.config.language import LanguageModelConfig
from plugtron.errors import ConfigError

POSITION_EMBEDDINGS = ("learned_absolute", "rope", "yarn", "mrope", "none")
ROTARY = ("rope", "yarn", "mrope")
#: TransformerConfig switches the GPT layer specs do not build (they would be ignored silently).
UNSUPPORTED: dict[str, str] = {}
DENSE_CONFIG = "megatron.core.transformer.transformer_config:TransformerConfig"
MLA_CONFIG = "megatron.core.transformer.transformer_config:MLATransformerConfig"


class SequenceParallelNote(UserWarning):
    """sequence_parallel was left unset and is switched on because MoE/MLA at TP > 1 need it."""


YARN_FIELDS = (
    "yarn_rotary_scaling_factor", "yarn_original_max_position_embeddings", "yarn_beta_fast",
    "yarn_beta_slow", "yarn_mscale", "yarn_mscale_all_dim", "yarn_correction_range_round_to_int",
)


@model_config
class GPTModelConfig(LanguageModelConfig):
    """A GPT model. TransformerConfig fields (num_layers, hidden_size,
    num_query_groups, normalization, qk_layernorm, mtp_num_layers ...) are
    set and read directly on this object."""

    family: ClassVar[str] = "gpt"
    unsupported: ClassVar[dict[str, str]] = UNSUPPORTED
    #: The field *names* are MLATransformerConfig's (a superset of TransformerConfig's);
    #: the live object is MLATransformerConfig only with multi_latent_attention
    #: (see :meth:`transformer_config_path`), so dense models keep TransformerConfig's defaults.
    transformer_config_class: ClassVar[str] = MLA_CONFIG

    position_embedding_type: str = "rope"
    rotary_percent: float = 1.0
    rotary_base: int = 10000
    #: Llama-3 frequency scaling (megatron's constants: low 1, high 4, original 8192).
    rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    #: Linear position interpolation for rope/mrope: positions are divided by it.
    seq_len_interpolation_factor: float | None = None
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
    # Architecture variants (Gemma, Granite, Olmo2, Glm4 ...): semantics in plugtron_gpt.variant_rules
    # and plugins/gpt/README.md; which layer specs implement them in plugtron_gpt.features.
    attention_softcap: float | None = None
    final_logit_softcap: float | None = None
    logits_divisor: float | None = None
    embedding_multiplier: float | None = None
    embedding_multiplier_cast: bool = False
    norm_placement: str = "pre"
    residual_multiplier: float | None = None
    qk_norm_scope: str = "head"
    rotary_base_local: float | None = None

    @property
    def qk_layernorm(self) -> bool:
        """Whether q/k are normalised, as set (megatron's live config says False for ``qk_norm_scope='full'``).

        megatron's ``finalize_model_grads`` sums the grads of every parameter
        named ``q_layernorm``/``k_layernorm`` over TP when its config has
        ``qk_layernorm``; full-width q/k norm weights are TP shards, so the
        live config must not say it (see :meth:`megatron_kwargs`).
        """
        return bool(self._get("qk_layernorm", False))

    def rotary_dim(self) -> int:
        """Channels per head that RoPE rotates: int(kv_channels x rotary_percent), as megatron computes it.

        With MLA only the ``qk_pos_emb_head_dim`` channels are rotated.
        """
        if self.is_mla():
            dim = self._get("qk_pos_emb_head_dim", 64)
            return int(dim * self.rotary_percent) if self.rotary_percent < 1.0 else dim
        kv = self._get("kv_channels") or self._get("hidden_size") // self._get("num_attention_heads")
        return int(kv * self.rotary_percent) if self.rotary_percent < 1.0 else kv

    # -- MoE / MLA -----------------------------------------------------------
    def is_moe(self) -> bool:
        return bool(self._get("num_moe_experts"))

    def is_mla(self) -> bool:
        return bool(self._get("multi_latent_attention"))

    def auto_sequence_parallel(self) -> bool:
        """Whether sequence parallelism is switched on for the user (left unset, TP > 1, MoE or MLA)."""
        tp = self._get("tensor_model_parallel_size", 1) or 1
        return tp > 1 and (self.is_moe() or self.is_mla()) and "sequence_parallel" not in self._tc_kwargs

    def megatron_kwargs(self) -> dict[str, Any]:
        """The keywords megatron's config class receives: the ones set, plus what the family derives."""
        kwargs = super().megatron_kwargs()
        if self.auto_sequence_parallel():
            kwargs["sequence_parallel"] = True
        if self.is_mla():
            from plugtron_gpt.moe_rules import mla_rope_kwargs

            kwargs.update(mla_rope_kwargs(self))
        from plugtron_gpt.variant_rules import variant_kwargs

        kwargs.update(variant_kwargs(self, kwargs))
        return kwargs

    def transformer_config_path(self) -> str:
        """megatron's TransformerConfig, or MLATransformerConfig with multi_latent_attention."""
        return MLA_CONFIG if self.is_mla() else DENSE_CONFIG

    # -- validation --------------------------------------------------------
    def validate(self) -> None:
        """Each rule group raises :class:`ConfigError` naming the field it blames."""
        super().validate()
        self._check_position_embedding()
        self._check_unused_position_fields()
        if self.position_embedding_type in ROTARY:
            self._check_rotary()
        if self.position_embedding_type == "yarn":
            self._check_yarn()
        if self.position_embedding_type == "mrope":
            self._check_mrope()
        self._check_mtp()
        from plugtron_gpt import moe_rules

        moe_rules.check_moe(self)
        moe_rules.check_mla(self)
        moe_rules.check_tensor_parallel(self)
        from plugtron_gpt import variant_rules

        variant_rules.check_variants(self)

    def _is_default(self, name: str) -> bool:
        return getattr(self, name) == attrs.fields_dict(type(self))[name].default

    def _check_position_embedding(self) -> None:
        kind = self.position_embedding_type
        if kind not in POSITION_EMBEDDINGS:
            self._fail("position_embedding_type", f"must be one of {', '.join(POSITION_EMBEDDINGS)}, not {kind!r}")
        if not 0.0 < self.rotary_percent <= 1.0:
            self._fail("rotary_percent", "must be in (0, 1]")
        if self.rotary_base <= 0:
            self._fail("rotary_base", "must be positive")

    def _check_unused_position_fields(self) -> None:
        """Opt-in modifiers of a position embedding the model does not use would be ignored silently."""
        kind = self.position_embedding_type
        if self.rope_scaling and kind != "rope":
            self._fail("rope_scaling", f"Llama-3 scaling applies to position_embedding_type='rope' only, not {kind!r}")
        if not self.rope_scaling and not self._is_default("rope_scaling_factor"):
            self._fail("rope_scaling_factor", "is set but rope_scaling is False, so it would be ignored")
        if self.rope_scaling and self.rope_scaling_factor < 1.0:
            self._fail("rope_scaling_factor", "must be >= 1 (Llama-3 scaling divides low frequencies by it)")
        if self.seq_len_interpolation_factor is not None:
            if kind not in ("rope", "mrope"):
                self._fail("seq_len_interpolation_factor", f"is used by rope and mrope only; megatron ignores it for {kind!r}")
            if self.rope_scaling:
                self._fail("seq_len_interpolation_factor", "cannot be combined with rope_scaling")
            if self.seq_len_interpolation_factor < 1.0:
                self._fail("seq_len_interpolation_factor", "must be >= 1 (positions are divided by it)")
        if kind != "yarn":
            for name in YARN_FIELDS:
                if not self._is_default(name):
                    self._fail(name, f"only applies to position_embedding_type='yarn', not {kind!r}")
        if kind != "mrope" and self._get("mrope_section") is not None:
            self._fail("mrope_section", f"only applies to position_embedding_type='mrope', not {kind!r}")

    def _check_rotary(self) -> None:
        dim = self.rotary_dim()
        if (dim < 2 or dim % 2) and self.is_mla():
            self._fail("qk_pos_emb_head_dim", f"qk_pos_emb_head_dim x rotary_percent = {dim} rotary channels; RoPE needs an even number >= 2")
        if dim < 2 or dim % 2:
            self._fail("rotary_percent", f"kv_channels x rotary_percent = {dim} rotary channels; RoPE needs an even number >= 2")

    def _check_yarn(self) -> None:
        if self.rotary_percent != 1.0:
            self._fail("rotary_percent", "megatron's YaRN rotates all kv_channels; partial rotary is not supported")
        if self._get("rotary_interleaved"):
            self._fail("rotary_interleaved", "megatron's YaRN does not support interleaved rotary embeddings")
        if self.yarn_rotary_scaling_factor <= 0:
            self._fail("yarn_rotary_scaling_factor", "must be positive")
        if self.yarn_original_max_position_embeddings <= 0:
            self._fail("yarn_original_max_position_embeddings", "must be positive")
        if not self.yarn_beta_fast >= self.yarn_beta_slow > 0:  # equal (Kimi-K2): both libraries widen the ramp alike
            self._fail("yarn_beta_fast", f"need yarn_beta_fast >= yarn_beta_slow > 0, got {self.yarn_beta_fast} and {self.yarn_beta_slow}")

    def _check_mrope(self) -> None:
        if self._get("rotary_interleaved"):
            self._fail("rotary_interleaved", "megatron 0.16's multimodal RoPE fails with interleaved rotary embeddings")
        section = self._get("mrope_section")
        if not section:
            self._fail("mrope_section", "is required for position_embedding_type='mrope'")
        if len(section) != 3 or not all(isinstance(s, int) and s >= 0 for s in section):
            self._fail("mrope_section", f"must be 3 non-negative integers (temporal, height, width), got {section!r}")
        half = self.rotary_dim() // 2
        if sum(section) != half:
            self._fail("mrope_section", f"sums to {sum(section)} but must equal the rotary frequencies per head, kv_channels x rotary_percent / 2 = {half}")

    def _check_mtp(self) -> None:
        layers: Any = self._get("mtp_num_layers")
        if layers is None:
            return
        if not isinstance(layers, int) or layers < 0:
            self._fail("mtp_num_layers", f"must be a non-negative integer, got {layers!r}")
        factor = self._get("mtp_loss_scaling_factor", 0.1)
        if layers and (factor is None or factor < 0):
            self._fail("mtp_loss_scaling_factor", f"must be >= 0 when mtp_num_layers is set, got {factor!r}")
