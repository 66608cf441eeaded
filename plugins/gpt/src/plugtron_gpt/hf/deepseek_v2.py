"""``DeepseekV2ForCausalLM`` (DeepSeek-V2, V2-Lite): DeepSeek-V3's MLA and experts with a softmax router.

Derived from :mod:`.deepseek_v3` (same tensors, no ``e_score_correction_bias``).
transformers' DeepSeek-V2 router takes the top-k of a softmax over all experts
and scales the kept probabilities by ``routed_scaling_factor`` without
renormalising them: megatron's ``moe_router_pre_softmax`` with
``moe_router_topk_scaling_factor``. It ignores ``norm_topk_prob`` (the original
DeepSeek code did not), so a file with ``norm_topk_prob=true`` is ambiguous and
refused. Its RoPE multiplies complex pairs, i.e. interleaved rotary rows, which
megatron's MLA expects: rows are copied. ``topk_method="group_limited_greedy"``
scores a group by its best expert: megatron's group-limited routing with
``topk // topk_group == 1``; other splits are refused.
"""

from __future__ import annotations

from typing import Any

from plugtron.conversion import INT, STR, ConfigReader, ConfigSchema, UnsupportedConfigError

from .adapter import GPTAdapter
from .architecture import Fields
from .deepseek_v3 import DEEPSEEK_V3, TYPES, _groups, derive_mla, read_experts, read_mla, write_experts, write_mla
from .rope import need_value

TOPK_METHODS = ("greedy", "group_limited_greedy")


def _read(k: ConfigReader) -> Fields:
    if k.get("mlp_bias"):
        raise k.fail("mlp_bias", "is True: DeepSeek-V2's expert and shared-expert biases are not converted")
    fields = read_experts(k, read_mla(k))
    if k.get("norm_topk_prob"):
        raise k.fail("norm_topk_prob", "is True, which transformers' DeepSeek-V2 ignores (the original code "
                                       "renormalises): ambiguous, refusing to pick one")
    method = k.get("topk_method")
    if method not in TOPK_METHODS:
        raise k.fail("topk_method", f"is {method!r}; transformers' DeepSeek-V2 supports {list(TOPK_METHODS)}")
    experts, topk = fields["num_moe_experts"], fields["moe_router_topk"]
    groups = _groups(k, experts, topk, 1) if method == "group_limited_greedy" else {}
    if method == "greedy":
        k.mark("n_group", "topk_group")  # greedy routing ignores them
    return {**fields, **groups, "moe_router_pre_softmax": True,
            "moe_router_topk_scaling_factor": float(k.get("routed_scaling_factor"))}


def _write(f: Fields) -> dict[str, Any]:
    arch = DEEPSEEK_V2.name
    need_value(f, "moe_router_score_function", ("softmax",), arch, "softmax")
    need_value(f, "moe_router_enable_expert_bias", (False,), arch, False)
    if not f.get("moe_router_pre_softmax") and f.get("moe_router_topk", 2) > 1:
        need_value(f, "moe_router_pre_softmax", (True,), arch, False)
    if f.get("mtp_num_layers"):
        raise UnsupportedConfigError("mtp_num_layers", f"is {f['mtp_num_layers']}; {arch} has no MTP layers")
    groups, keep, topk = f.get("moe_router_num_groups"), f.get("moe_router_group_topk"), f.get("moe_router_topk", 2)
    router: dict[str, Any] = {"topk_method": "greedy", "n_group": None, "topk_group": None}  # n_group 1: no groups
    if groups:
        if topk // keep != 1:
            raise UnsupportedConfigError("moe_router_group_topk", f"is {keep} with moe_router_topk={topk}: HF scores "
                                         "a group by its best expert, megatron by its top topk // group_topk")
        router = {"topk_method": "group_limited_greedy", "n_group": groups, "topk_group": keep}
    scale = f.get("moe_router_topk_scaling_factor")
    return {**write_mla(f, arch), **write_experts(f, arch), **router, "norm_topk_prob": False,
            "routed_scaling_factor": 1.0 if scale is None else float(scale)}


DEFAULTS = {
    "vocab_size": 102400, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu", "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "head_dim": None,
    "first_k_dense_replace": 0, "kv_lora_rank": 512, "q_lora_rank": 1536, "n_group": None, "n_routed_experts": 64,
    "output_router_logits": False, "n_shared_experts": 2, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "routed_scaling_factor": 1.0, "topk_group": None, "topk_method": "greedy", "norm_topk_prob": False,
    "v_head_dim": 128, "num_experts_per_tok": None, "moe_intermediate_size": 1407,
}


def _derive(values: dict[str, Any]) -> None:
    if "num_experts" in values:  # attribute_map: num_experts spells n_routed_experts
        values["n_routed_experts"] = values["num_experts"]
    derive_mla(values)


DEEPSEEK_V2 = DEEPSEEK_V3.derive(
    name="DeepseekV2ForCausalLM", model_type="deepseek_v2", config_class="DeepseekV2Config", read=_read, write=_write,
    expresses=frozenset({"num_moe_experts", "multi_latent_attention"}),
    table=DEEPSEEK_V3.table,  # e_score_correction_bias only with moe_router_enable_expert_bias, never set here
    schema=ConfigSchema(defaults=DEFAULTS, types={**TYPES, "topk_method": STR, "first_k_dense_replace": INT, "v_head_dim": INT}, derive=_derive,
                        non_numeric=frozenset({"pretraining_tp", "auto_map"}),
                        harmless_at={"ep_size": 1, "moe_layer_freq": 1, "scoring_func": "softmax", "seq_aux": True,
                                     "aux_loss_alpha": 0.001}))

ADAPTER = GPTAdapter(DEEPSEEK_V2)
