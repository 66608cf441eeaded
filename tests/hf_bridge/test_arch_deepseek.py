"""DeepSeek-V3 (Kimi-K2, Moonlight), DeepSeek-V2 and GLM-4.5 (Glm4Moe), single process unless marked: published config.json
files, fields that matter, refusals by name, the MLA / MTP tensor table, a non-zero
``e_score_correction_bias``, and expert-parallel (EP=2, TP=2+EP=2) parity in one two-rank launch.

TP=1 / TP=2 (sequence parallel) / PP=2 parity and the bit-exact round trips run through the shared
harness (``arch_cases/deepseek.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from arch_cases import field_matters, save_case
from arch_cases.deepseek import DEEPSEEK_V2, DEEPSEEK_V3, GLM4_MOE, MOONLIGHT
from plugtron.conversion import UnsupportedConfigError
from plugtron_gpt.hf import catalogue

# -- config.json files as published on the hub ------------------------------------------------------
_DEEPSEEK_COMMON = {"attention_bias": False, "attention_dropout": 0.0, "aux_loss_alpha": 0.001, "ep_size": 1,
                    "hidden_act": "silu", "initializer_range": 0.02, "moe_layer_freq": 1, "pretraining_tp": 1,
                    "seq_aux": True, "tie_word_embeddings": False, "use_cache": True, "torch_dtype": "bfloat16",
                    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "kv_lora_rank": 512}
DEEPSEEK_V3_671B = {  # deepseek-ai/DeepSeek-V3 (its quantization_config FP8 below: see test_fp8_checkpoints_...)
    **_DEEPSEEK_COMMON, "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModel": "modeling_deepseek.DeepseekV3Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
    "bos_token_id": 0, "eos_token_id": 1, "first_k_dense_replace": 3, "hidden_size": 7168,
    "intermediate_size": 18432, "max_position_embeddings": 163840, "moe_intermediate_size": 2048, "n_group": 8,
    "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_group": 4,
    "topk_method": "noaux_tc", "transformers_version": "4.33.1", "vocab_size": 129280}
FP8 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
DEEPSEEK_V2_LITE = {  # deepseek-ai/DeepSeek-V2-Lite
    **_DEEPSEEK_COMMON, "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV2Config",
                 "AutoModel": "modeling_deepseek.DeepseekV2Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM"},
    "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_size": 2048,
    "intermediate_size": 10944, "max_position_embeddings": 163840, "moe_intermediate_size": 1408, "n_group": 1,
    "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16,
    "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16, "q_lora_rank": None,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "topk_group": 1,
    "topk_method": "greedy", "transformers_version": "4.33.1", "vocab_size": 102400}
MOONLIGHT_16B = {  # moonshotai/Moonlight-16B-A3B
    **_DEEPSEEK_COMMON, "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModel": "modeling_deepseek.DeepseekV3Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
    "bos_token_id": 163584, "eos_token_id": 163585, "first_k_dense_replace": 1, "hidden_size": 2048,
    "intermediate_size": 11264, "max_position_embeddings": 8192, "moe_intermediate_size": 1408, "n_group": 1,
    "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": True, "num_attention_heads": 16,
    "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16, "q_lora_rank": None,
    "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 50000.0, "routed_scaling_factor": 2.446,
    "scoring_func": "sigmoid", "topk_group": 1, "topk_method": "noaux_tc", "transformers_version": "4.46.3",
    "vocab_size": 163840}
KIMI_K2 = {  # moonshotai/Kimi-K2-Instruct (its FP8 quantization_config: see test_fp8_checkpoints_...); no ep_size
    **{k: v for k, v in _DEEPSEEK_COMMON.items() if k != "ep_size"}, "architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2",
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModel": "modeling_deepseek.DeepseekV3Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
    "bos_token_id": 163584, "eos_token_id": 163585, "first_k_dense_replace": 1, "hidden_size": 7168,
    "intermediate_size": 18432, "max_position_embeddings": 131072, "moe_intermediate_size": 2048, "n_group": 1,
    "n_routed_experts": 384, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 64,
    "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 64, "num_nextn_predict_layers": 0,
    "q_lora_rank": 1536, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 50000.0, "routed_scaling_factor": 2.827, "scoring_func": "sigmoid", "topk_group": 1,
    "topk_method": "noaux_tc", "transformers_version": "4.48.3", "vocab_size": 163840}
GLM_45_AIR = {  # zai-org/GLM-4.5-Air
    "architectures": ["Glm4MoeForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "pad_token_id": 151329, "eos_token_id": [151329, 151336, 151338], "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 4096, "partial_rotary_factor": 0.5, "initializer_range": 0.02, "intermediate_size": 10944,
    "max_position_embeddings": 131072, "model_type": "glm4_moe", "moe_intermediate_size": 1408, "norm_topk_prob": True,
    "num_attention_heads": 96, "n_group": 1, "topk_group": 1, "n_routed_experts": 128, "n_shared_experts": 1,
    "routed_scaling_factor": 1.0, "num_experts_per_tok": 8, "first_k_dense_replace": 1, "num_hidden_layers": 46,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 1000000,
    "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.54.0", "use_cache": True, "use_qk_norm": False, "vocab_size": 151552}

_V3 = {"multi_latent_attention": True, "qk_layernorm": True, "qk_head_dim": 128, "qk_pos_emb_head_dim": 64,
       "v_head_dim": 128, "kv_lora_rank": 512, "moe_router_pre_softmax": False}
PUBLISHED = [
    ("DeepSeek-V3", DEEPSEEK_V3_671B, {
        **_V3, "q_lora_rank": 1536, "num_moe_experts": 256, "moe_router_topk": 8, "moe_ffn_hidden_size": 2048,
        "moe_shared_expert_intermediate_size": 2048, "moe_layer_freq": [0] * 3 + [1] * 58,
        "moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True, "moe_router_num_groups": 8,
        "moe_router_group_topk": 4, "moe_router_topk_scaling_factor": 2.5, "position_embedding_type": "yarn",
        "yarn_rotary_scaling_factor": 40, "yarn_mscale": 1.0, "yarn_mscale_all_dim": 1.0, "mtp_num_layers": None}),
    ("DeepSeek-V2-Lite", DEEPSEEK_V2_LITE, {
        "multi_latent_attention": True, "q_lora_rank": None, "num_moe_experts": 64, "moe_router_topk": 6,
        "moe_router_pre_softmax": True, "moe_shared_expert_intermediate_size": 2816,
        "moe_layer_freq": [0] + [1] * 26, "moe_router_topk_scaling_factor": 1.0, "yarn_mscale": 0.707,
        "yarn_mscale_all_dim": 0.707, "ffn_hidden_size": 10944}),
    ("Moonlight-16B-A3B", MOONLIGHT_16B, {
        **_V3, "q_lora_rank": None, "num_moe_experts": 64, "moe_router_topk": 6, "moe_router_num_groups": None,
        "moe_router_topk_scaling_factor": 2.446, "position_embedding_type": "rope", "rotary_base": 50000.0,
        "layernorm_epsilon": 1e-5}),
    ("GLM-4.5-Air", GLM_45_AIR, {
        "kv_channels": 128, "num_query_groups": 8, "add_qkv_bias": True, "add_bias_linear": False,
        "qk_layernorm": False, "rotary_percent": 0.5, "rotary_interleaved": None, "rotary_base": 1000000,
        "num_moe_experts": 128, "moe_router_topk": 8, "moe_shared_expert_intermediate_size": 1408,
        "moe_layer_freq": [0] + [1] * 45, "moe_router_score_function": "sigmoid",
        "moe_router_enable_expert_bias": True, "moe_router_num_groups": None, "moe_router_topk_scaling_factor": 1.0}),
]


def fields_of(cfg: dict[str, Any]) -> dict[str, Any]:
    return catalogue.to_megatron_fields(cfg)


def _cfg(case: Any, **changes: Any) -> dict[str, Any]:
    return {**case.config, "architectures": [case.architecture], **changes}


@pytest.mark.parametrize("model,cfg,expected", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_published_configs_translate(model, cfg, expected) -> None:
    fields = fields_of(cfg)
    assert {k: fields.get(k) for k in expected} == expected
    exported = catalogue.from_megatron_fields(fields, cfg["architectures"][0], passthrough=cfg)
    assert fields_of(exported) == fields


def test_kimi_k2_translates_through_deepseek_v3() -> None:
    """Kimi-K2's file says ``model_type: kimi_k2`` with the DeepSeek-V3 class (its remote code is DeepSeek-V3's)."""
    fields = catalogue.to_megatron_fields(KIMI_K2)
    assert fields == catalogue.to_megatron_fields({**KIMI_K2, "model_type": "deepseek_v3"})
    assert fields["num_moe_experts"] == 384 and fields["moe_router_topk_scaling_factor"] == 2.827
    assert fields["yarn_rotary_scaling_factor"] == 32.0 and fields["yarn_beta_fast"] == fields["yarn_beta_slow"] == 1.0
    with pytest.raises(UnsupportedConfigError) as info:
        catalogue.to_megatron_fields({**KIMI_K2, "model_type": "deepseek_v2"})
    assert info.value.field == "model_type"


@pytest.mark.parametrize("cfg", [DEEPSEEK_V3_671B, KIMI_K2], ids=["DeepSeek-V3", "Kimi-K2-Instruct"])
def test_fp8_checkpoints_are_accepted_and_other_schemes_refused_by_name(cfg) -> None:
    """Block-scaled FP8 goes to the engine's dequantisation; anything else is refused naming the setting."""
    assert fields_of({**cfg, "quantization_config": FP8}) == fields_of(cfg)
    for change, field in (({"weight_block_size": None}, "quantization_config.weight_block_size"),
                          ({"quant_method": "mxfp4"}, "quantization_config.quant_method"),
                          ({"activation_scheme": "static"}, "quantization_config.activation_scheme")):
        with pytest.raises(UnsupportedConfigError) as info:
            fields_of({**cfg, "quantization_config": {**FP8, **change}})
        assert info.value.field == field, str(info.value)


# -- fields that matter -----------------------------------------------------------------------------
MATTERS = [
    (DEEPSEEK_V3, "routed_scaling_factor", 1.0), (DEEPSEEK_V3, "n_group", 1), (DEEPSEEK_V3, "first_k_dense_replace", 2),
    (DEEPSEEK_V3, "n_shared_experts", 2),
    (DEEPSEEK_V3, "rope_parameters", {**DEEPSEEK_V3.config["rope_parameters"], "mscale_all_dim": 1.0}),
    (DEEPSEEK_V3, "rope_parameters", {**DEEPSEEK_V3.config["rope_parameters"], "mscale": 1.0}),
    (DEEPSEEK_V2, "routed_scaling_factor", 1.0), (DEEPSEEK_V2, "topk_method", "greedy"),
    (MOONLIGHT, "num_experts_per_tok", 3),
    (GLM4_MOE, "rope_parameters", {**GLM4_MOE.config["rope_parameters"], "partial_rotary_factor": 1.0}),
    (GLM4_MOE, "use_qk_norm", False), (GLM4_MOE, "n_group", 1), (GLM4_MOE, "routed_scaling_factor", 1.0),
    (GLM4_MOE, "first_k_dense_replace", 2),
]


@pytest.mark.parametrize("case,key,value", MATTERS, ids=[f"{c.name}-{k}-{i}" for i, (c, k, _) in enumerate(MATTERS)])
def test_translated_field_moves_transformers_logits(tmp_path, case, key, value) -> None:
    assert field_matters(tmp_path, case, key, value) > 1e-3


# -- refusals ---------------------------------------------------------------------------------------
REFUSED = [
    ("v3 rope not interleaved", _cfg(DEEPSEEK_V3, rope_interleave=False), "rope_interleave", "re-ordering"),
    ("v3 sigmoid not renormalised", _cfg(DEEPSEEK_V3, norm_topk_prob=False), "norm_topk_prob", "renormalises"),
    ("v3 group score not top-2", _cfg(DEEPSEEK_V3, num_experts_per_tok=3), "topk_group", "top 3 experts"),
    ("v3 attention_bias", _cfg(DEEPSEEK_V3, attention_bias=True), "attention_bias", "q_a/kv_a/o_proj"),
    ("v3 mscale_all_dim alone", _cfg(DEEPSEEK_V3, rope_parameters={**DEEPSEEK_V3.config["rope_parameters"],
                                                                   "mscale": 0.0}),
     "rope_parameters.mscale_all_dim", "without mscale"),
    ("v3 linear rope", _cfg(DEEPSEEK_V3, rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}),
     "rope_parameters.rope_type", "'linear'"),
    ("v3 no shared expert", _cfg(DEEPSEEK_V3, n_shared_experts=0), "n_shared_experts", "zero-width"),
    ("v3 all dense", _cfg(DEEPSEEK_V3, first_k_dense_replace=4), "first_k_dense_replace", "at least one"),
    ("v3 qk_head_dim", _cfg(DEEPSEEK_V3, qk_head_dim=20), "qk_head_dim", "derives 16"),
    ("v3 other scoring_func", _cfg(DEEPSEEK_V3, scoring_func="softmax"), "scoring_func", "'sigmoid'"),
    ("v3 other topk_method", _cfg(DEEPSEEK_V3, topk_method="greedy"), "topk_method", "'noaux_tc'"),
    ("v2 norm_topk_prob", _cfg(DEEPSEEK_V2, norm_topk_prob=True), "norm_topk_prob", "ambiguous"),
    ("v2 noaux_tc", _cfg(DEEPSEEK_V2, topk_method="noaux_tc"), "topk_method", "'noaux_tc'"),
    ("v2 group score not the best expert", _cfg(DEEPSEEK_V2, topk_group=1), "topk_group", "top 3 experts"),
    ("v2 mlp_bias", _cfg(DEEPSEEK_V2, mlp_bias=True), "mlp_bias", "biases"),
    ("glm sigmoid not renormalised", _cfg(GLM4_MOE, norm_topk_prob=False), "norm_topk_prob", "renormalises"),
    ("glm group score not top-2", _cfg(GLM4_MOE, num_experts_per_tok=3), "topk_group", "top 3 experts"),
    ("glm no shared expert", _cfg(GLM4_MOE, n_shared_experts=0), "n_shared_experts", "zero-width"),
    ("glm unknown key", _cfg(GLM4_MOE, scoring_func="sigmoid"), "scoring_func", "unknown"),
    ("v2 sigmoid scoring", _cfg(DEEPSEEK_V2, scoring_func="sigmoid"), "scoring_func", "'softmax'"),
]


@pytest.mark.parametrize("cfg,field,words", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_what_megatron_cannot_express_is_refused_by_name(cfg, field, words) -> None:
    with pytest.raises(UnsupportedConfigError) as info:
        fields_of(cfg)
    assert info.value.field == field and words in str(info.value), str(info.value)


EXPORT_REFUSED = [
    ("DeepseekV3ForCausalLM", DEEPSEEK_V3, {"moe_router_score_function": "softmax"}, "moe_router_score_function"),
    ("DeepseekV3ForCausalLM", DEEPSEEK_V3, {"moe_router_group_topk": 2}, "moe_router_group_topk"),
    ("DeepseekV3ForCausalLM", DEEPSEEK_V3, {"moe_layer_freq": [1, 0, 1, 1]}, "moe_layer_freq"),
    ("DeepseekV3ForCausalLM", DEEPSEEK_V3, {"moe_shared_expert_intermediate_size": 30},
     "moe_shared_expert_intermediate_size"),
    ("DeepseekV2ForCausalLM", DEEPSEEK_V2, {"mtp_num_layers": 1}, "mtp_num_layers"),  # checked before write()
    ("DeepseekV2ForCausalLM", DEEPSEEK_V2, {"moe_router_enable_expert_bias": True}, "moe_router_enable_expert_bias"),
    ("DeepseekV2ForCausalLM", DEEPSEEK_V2, {"moe_router_group_topk": 1}, "moe_router_group_topk"),
    ("Qwen3MoeForCausalLM", DEEPSEEK_V3, {}, "multi_latent_attention"),
    ("Glm4MoeForCausalLM", DEEPSEEK_V3, {}, "multi_latent_attention"),
    ("Glm4MoeForCausalLM", GLM4_MOE, {"moe_router_pre_softmax": True}, "moe_router_pre_softmax"),
]


@pytest.mark.parametrize("arch,case,changes,field", EXPORT_REFUSED, ids=[f"{a}-{f}" for a, _, _, f in EXPORT_REFUSED])
def test_export_refuses_what_the_hf_architecture_cannot_hold(arch, case, changes, field) -> None:
    fields = {**fields_of(_cfg(case)), **changes}
    with pytest.raises(UnsupportedConfigError) as info:
        catalogue.from_megatron_fields(fields, arch)
    assert info.value.field == field


@pytest.mark.parametrize("case", [DEEPSEEK_V3, GLM4_MOE], ids=["deepseek_v3", "glm4_moe"])
def test_export_writes_the_mtp_layer_count(case) -> None:
    fields = {**fields_of(_cfg(case)), "mtp_num_layers": 2}
    assert catalogue.from_megatron_fields(fields, case.architecture)["num_nextn_predict_layers"] == 2
    assert catalogue.from_megatron_fields(fields_of(_cfg(case)), case.architecture)["num_nextn_predict_layers"] == 0


# -- tensor table -----------------------------------------------------------------------------------
def test_mla_table_with_and_without_query_compression() -> None:
    v3 = {m.megatron_name: m for m in catalogue.mapping_for("DeepseekV3ForCausalLM", fields_of(_cfg(DEEPSEEK_V3)))}
    up = v3["decoder.layers.0.self_attention.linear_q_up_proj.weight"]
    assert up.hf_names == ("model.layers.0.self_attn.q_b_proj.weight",) and up.megatron_shape == (4 * 16, 24)
    assert v3["decoder.layers.1.self_attention.linear_kv_down_proj.weight"].megatron_shape == (16 + 8, 64)
    assert v3["decoder.layers.1.self_attention.linear_kv_up_proj.weight"].megatron_shape == (4 * (8 + 12), 16)
    assert v3["decoder.layers.2.mlp.router.expert_bias"].hf_names == ("model.layers.2.mlp.gate.e_score_correction_bias",)
    assert "decoder.layers.0.mlp.router.weight" not in v3 and "decoder.layers.0.mlp.linear_fc1.weight" in v3
    assert "decoder.layers.0.self_attention.linear_q_proj.weight" not in v3
    v2 = {m.megatron_name: m for m in catalogue.mapping_for("DeepseekV2ForCausalLM", fields_of(_cfg(DEEPSEEK_V2)))}
    assert v2["decoder.layers.0.self_attention.linear_q_proj.weight"].hf_names == ("model.layers.0.self_attn.q_proj.weight",)
    assert "decoder.layers.1.mlp.router.expert_bias" not in v2 and "decoder.layers.0.self_attention.q_layernorm.weight" not in v2
    assert v2["decoder.layers.1.mlp.shared_experts.linear_fc1.weight"].megatron_shape == (2 * 2 * 24, 64)


def test_mtp_layers_map_to_the_layers_after_the_decoder() -> None:
    """``mtp_num_layers`` MTP layers read ``model.layers.{num_hidden_layers + m}`` (MoE like the last layer)."""
    glm = {m.megatron_name: m for m in catalogue.mapping_for(
        "Glm4MoeForCausalLM", {**fields_of(_cfg(GLM4_MOE)), "mtp_num_layers": 1})}
    assert glm["mtp.layers.0.transformer_layer.self_attention.linear_qkv.weight"].hf_names[0] == (
        "model.layers.4.self_attn.q_proj.weight")
    fields = {**fields_of(_cfg(DEEPSEEK_V3)), "mtp_num_layers": 1}
    by_name = {m.megatron_name: m for m in catalogue.mapping_for("DeepseekV3ForCausalLM", fields)}
    assert by_name["mtp.layers.0.eh_proj.weight"].hf_names == ("model.layers.4.eh_proj.weight",)
    assert by_name["mtp.layers.0.eh_proj.weight"].megatron_shape == (64, 128)
    assert by_name["mtp.layers.0.enorm.weight"].hf_names == ("model.layers.4.enorm.weight",)
    assert by_name["mtp.layers.0.final_layernorm.weight"].hf_names == ("model.layers.4.shared_head.norm.weight",)
    expert = by_name["mtp.layers.0.transformer_layer.mlp.experts.local_experts.7.linear_fc2.weight"]
    assert expert.hf_names == ("model.layers.4.mlp.experts.7.down_proj.weight",)
    assert by_name["mtp.layers.0.transformer_layer.self_attention.linear_q_up_proj.weight"].hf_names == (
        "model.layers.4.self_attn.q_b_proj.weight",)
    plain = {m.megatron_name for m in catalogue.mapping_for("DeepseekV3ForCausalLM", fields_of(_cfg(DEEPSEEK_V3)))}
    assert not any(n.startswith("mtp.") for n in plain)


def _with_extra_tensors(directory: Path, extra: dict[str, Any]) -> None:
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    save_file({**load_file(str(path)), **extra}, str(path), metadata={"format": "pt"})


def test_a_checkpoint_with_mtp_weights_is_not_converted_silently_without_them(tmp_path, plugtron_single_rank) -> None:
    """Published DeepSeek-V3 files store MTP as ``model.layers.{num_hidden_layers}``: never dropped silently."""
    import torch

    from plugtron_hf_bridge.importer import import_hf

    src = save_case(tmp_path / "hf", DEEPSEEK_V3)
    _with_extra_tensors(src, {"model.layers.4.eh_proj.weight": torch.zeros(64, 128),
                              "model.layers.4.enorm.weight": torch.ones(64)})
    with pytest.raises(Exception) as info:  # incomplete MTP layer: refused, naming the layer's tensors
        import_hf(src, parallel=plugtron_single_rank)
    assert "model.layers.4." in str(info.value), str(info.value)


def test_a_nonzero_expert_bias_reaches_megatron_and_comes_back(tmp_path, plugtron_single_rank) -> None:
    """``e_score_correction_bias`` changes which experts are chosen (1.48 logits error when dropped)."""
    import torch

    from hfb_helpers import bit_exact
    from plugtron_hf_bridge.exporter import export_hf
    from plugtron_hf_bridge.importer import import_hf
    from plugtron_hf_bridge.verify import verify

    src = save_case(tmp_path / "hf", DEEPSEEK_V3)
    bias = {f"model.layers.{i}.mlp.gate.e_score_correction_bias": torch.randn(8, generator=torch.Generator().manual_seed(i))
            for i in (1, 2, 3)}
    _with_extra_tensors(src, bias)
    imported = import_hf(src, parallel=plugtron_single_rank)
    router = imported.built.chunks[0].decoder.layers[1].mlp.router
    assert torch.equal(router.expert_bias, bias["model.layers.1.mlp.gate.e_score_correction_bias"])
    report = verify(src, imported=imported)
    assert report.max_abs_diff <= 1e-4 and report.top1_agreement == 1.0, report
    export_hf(imported.built, imported.plan.config, imported.plan.adapter, tmp_path / "out",
              source_hf_config=imported.plan.hf_config)
    assert bit_exact(src, tmp_path / "out") == []


@pytest.mark.parametrize("case", [DEEPSEEK_V3, GLM4_MOE], ids=["deepseek_v3", "glm4_moe"])
def test_bf16_checkpoint_keeps_its_float32_expert_bias(tmp_path, plugtron_single_rank, case) -> None:
    """transformers keeps ``e_score_correction_bias`` in float32 in bf16 checkpoints (``_keep_in_fp32_modules``),
    as published files store it; a bf16 import must keep its float32 values (1e-3 rounding moves routing)."""
    import torch
    import transformers

    from hfb_helpers import bit_exact
    from plugtron.sharding import unwrap
    from plugtron_hf_bridge.exporter import export_hf
    from plugtron_hf_bridge.importer import import_hf

    model = transformers.AutoModelForCausalLM.from_pretrained(save_case(tmp_path / "f32", case), dtype=torch.bfloat16)
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.01 + 0.3)
    model.save_pretrained(tmp_path / "hf")
    imported = import_hf(tmp_path / "hf", parallel=plugtron_single_rank)
    export_hf(imported.built, imported.plan.config, imported.plan.adapter, tmp_path / "out",
              source_hf_config=imported.plan.hf_config)
    assert unwrap(imported.built.chunks[0]).decoder.layers[1].mlp.router.expert_bias.dtype == torch.float32
    assert bit_exact(tmp_path / "hf", tmp_path / "out") == []


# -- expert parallelism (two ranks) ----------------------------------------------------------------
EP_RUNS = [(f"ep2 {c.name}", c, {"ep": 2}) for c in (DEEPSEEK_V3, DEEPSEEK_V2, GLM4_MOE)]
EP_RUNS += [(f"tp2 ep2 {c.name}", c, {"tp": 2, "ep": 2, "etp": 1}) for c in (DEEPSEEK_V3, DEEPSEEK_V2, GLM4_MOE)]


@pytest.fixture(scope="module")
def ep_results(tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("deepseek_ep")
    src = {c.name: save_case(tmp / c.name, c) for c in (DEEPSEEK_V3, DEEPSEEK_V2, GLM4_MOE)}
    scenarios = [{"name": name, "kind": "moe", "src": str(src[c.name]), **layout} for name, c, layout in EP_RUNS]
    from hfb_helpers import run_scenarios

    return {r["name"]: r for r in run_scenarios(scenarios, tmp / "out")[0]}


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", [r[0] for r in EP_RUNS])
def test_float32_parity_and_bit_exact_export_at_expert_layouts(ep_results, name) -> None:
    r = ep_results[name]
    assert r["diff"] <= 1e-4 and r["top1"] == 1.0 and r["cosine"] > 0.999999 and r["scale"] > 0.2, r
    assert r["mismatched"] == [], r
