"""``Glm4MoeForCausalLM`` (GLM-4.5, GLM-4.5-Air): Llama-like attention with DeepSeek-V3's experts and router.

Attention is grouped-query with q/k/v biases (``attention_bias``; ``o_proj`` never has
one: megatron's ``add_qkv_bias`` without ``add_bias_linear``), optional per-head q/k
RMSNorms before RoPE (``use_qk_norm``: megatron's ``qk_layernorm``), and rotate-half
RoPE on the first ``partial_rotary_factor`` (0.5 by default) of each head
(``rotary_percent``, not interleaved). ``head_dim`` is read from the file (published
files set one other than hidden / heads). The MLP half is DeepSeek-V3's (see
:mod:`.deepseek_v3`): ``first_k_dense_replace`` dense layers, then routed experts with
sigmoid scores, ``e_score_correction_bias``, group-limited top-k, renormalised and
scaled by ``routed_scaling_factor``, plus ``n_shared_experts`` shared experts. The
same two router cases are refused. MTP layers (``num_nextn_predict_layers``) are
stored as ``model.layers.{num_hidden_layers + m}`` as DeepSeek-V3's are.
"""

from __future__ import annotations

from typing import Any

from plugtron.conversion import BOOL, INT, ConfigReader, ConfigSchema

from .adapter import GPTAdapter
from .architecture import Fields, HFArchitecture
from .deepseek_v3 import DENSE_MLP, MOE_MLP, MTP_COPIES, decoder_with_mtp, TYPES, read_experts, read_sigmoid_router, write_experts, write_sigmoid_router
from .llama import DECODER_LAYER, head_dim_of, read_decoder, write_decoder
from .rope import need_value, refuse_partial_yarn

#: Llama's attention rules (its MLP rules are replaced by DeepSeek-V3's dense / MoE ones).
ATTENTION = [r for r in DECODER_LAYER if not r.megatron.startswith(("mlp.", "{mlp_"))]
LAYER = ATTENTION + DENSE_MLP + MOE_MLP
TABLE = decoder_with_mtp(LAYER)


def _read(k: ConfigReader) -> Fields:
    bias = bool(k.get("attention_bias"))
    fields = read_decoder(k, add_bias_linear=False, add_qkv_bias=bias, qk_layernorm=bool(k.get("use_qk_norm")),
                          partial_rotary=True, partial_rotary_default=0.5)
    refuse_partial_yarn(k, fields)
    return read_sigmoid_router(k, read_experts(k, fields))


def _write(f: Fields) -> dict[str, Any]:
    arch = GLM4_MOE.name
    need_value(f, "add_bias_linear", (False,), arch, True)
    need_value(f, "rotary_interleaved", (False,), arch, False)
    qk_norm = bool(f.get("qk_layernorm"))
    need_value(f, "qk_norm_scope", ("head",), arch, "head")
    return {**write_decoder(f, arch, qk_layernorm=qk_norm, partial_rotary=True), "head_dim": head_dim_of(f),
            "attention_bias": bool(f.get("add_qkv_bias")), "use_qk_norm": qk_norm, **write_experts(f, arch),
            **write_sigmoid_router(f, arch)}


def _derive(values: dict[str, Any]) -> None:
    for canonical, alias in (("n_routed_experts", "num_local_experts"), ("num_mtp_layers", "num_nextn_predict_layers")):
        if alias in values:  # attribute_map spellings
            values[canonical] = values[alias]


GLM4_MOE = HFArchitecture(
    name="Glm4MoeForCausalLM", model_type="glm4_moe", config_class="Glm4MoeConfig",
    schema=ConfigSchema(
        defaults={"vocab_size": 151552, "hidden_size": 4096, "intermediate_size": 10944, "num_hidden_layers": 46,
                  "num_attention_heads": 96, "num_key_value_heads": 8, "hidden_act": "silu",
                  "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                  "attention_bias": False, "moe_intermediate_size": 1408, "num_experts_per_tok": 8,
                  "output_router_logits": False, "n_shared_experts": 1, "n_routed_experts": 128,
                  "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
                  "norm_topk_prob": True, "use_qk_norm": False, "num_mtp_layers": 1, "head_dim": None},
        types={**TYPES, **dict.fromkeys(("num_key_value_heads", "n_group", "topk_group", "num_experts_per_tok",
                                         "first_k_dense_replace"), INT), "use_qk_norm": BOOL},
        derive=_derive, non_numeric=frozenset({"pretraining_tp"})),
    read=_read, write=_write, table=TABLE, expresses=frozenset({"num_moe_experts", "mtp_num_layers"}))

ADAPTER = GPTAdapter(GLM4_MOE, mtp_copies=MTP_COPIES)
