"""GPT configs with Mixture-of-Experts and Multi-Latent Attention: round trips and refusals.

megatron's own MoE / MLA fields live on the config; ``multi_latent_attention``
makes the live object megatron's ``MLATransformerConfig``; every impossible,
silently ignored, unavailable or wrong-gradient combination fails in
``finalize()`` naming the field and the rule (see ``plugtron_gpt.moe_rules``).
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest

from plugtron import ConfigError, availability
from plugtron.config import load, save, to_dict
from plugtron_gpt.config import GPTModelConfig, SequenceParallelNote

MOE = {"num_moe_experts": 4, "moe_ffn_hidden_size": 64}
MLA = {
    "multi_latent_attention": True, "num_query_groups": None, "q_lora_rank": 32, "kv_lora_rank": 16,
    "qk_head_dim": 16, "qk_pos_emb_head_dim": 8, "v_head_dim": 16,
}
YARN = {"position_embedding_type": "yarn", "yarn_rotary_scaling_factor": 40.0, "yarn_mscale": 0.9, "yarn_mscale_all_dim": 0.8,
        "yarn_original_max_position_embeddings": 64, "yarn_beta_fast": 16.0, "yarn_beta_slow": 2.0}
FULL = {
    **MOE, **MLA, **YARN, "num_moe_experts": 8, "moe_router_topk": 4, "moe_layer_freq": [0, 1],
    "moe_shared_expert_intermediate_size": 32, "moe_shared_expert_gate": True, "moe_router_score_function": "sigmoid",
    "moe_router_enable_expert_bias": True, "moe_router_bias_update_rate": 0.01, "moe_router_num_groups": 4,
    "moe_router_group_topk": 2, "moe_router_topk_scaling_factor": 2.5, "moe_router_load_balancing_type": "seq_aux_loss",
    "moe_aux_loss_coeff": 0.001, "moe_z_loss_coeff": 0.001, "moe_token_dispatcher_type": "alltoall",
    "moe_router_dtype": "fp64", "moe_expert_capacity_factor": 1.5, "moe_pad_expert_input_to_capacity": True,
    "moe_token_drop_policy": "position", "expert_model_parallel_size": 2, "expert_tensor_parallel_size": 1,
    "qk_layernorm": True, "mtp_num_layers": 1,
}


def same_value(a, b) -> bool:
    return a is b or a == b or (callable(a) and getattr(a, "func", a) is getattr(b, "func", b))


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_moe_mla_round_trip_is_exact(tiny_config, tmp_path: Path, suffix: str) -> None:
    config = tiny_config(**FULL)
    again = load(save(config, tmp_path / f"c{suffix}"))
    assert to_dict(again) == to_dict(config) and again == config
    config.finalize(), again.finalize()
    assert type(again.transformer).__name__ == "MLATransformerConfig"
    for field in dataclasses.fields(config.transformer):
        left, right = getattr(config.transformer, field.name), getattr(again.transformer, field.name)
        assert same_value(left, right), field.name
    assert again.moe_layer_freq == [0, 1] and again.moe_router_dtype == "fp64"


def test_dense_models_keep_transformer_config(tiny_config) -> None:
    """The MLA class has other defaults (RMSNorm, rotary fields): dense GPTs must not get it."""
    config = tiny_config(normalization="LayerNorm").finalize()
    assert type(config.transformer).__name__ == "TransformerConfig"
    assert tiny_config(**MOE).finalize().transformer.num_moe_experts == 4


def test_mla_rope_comes_from_the_family_fields(tiny_config) -> None:
    rope = tiny_config(**MLA, rotary_base=5000, rotary_percent=0.5).finalize().transformer
    assert (rope.rope_type, rope.rotary_base, rope.rotary_percent, rope.rotary_scaling_factor) == ("rope", 5000, 0.5, 1.0)
    yarn = tiny_config(**MLA, **YARN).finalize().transformer
    assert (yarn.rope_type, yarn.rotary_scaling_factor, yarn.original_max_position_embeddings) == ("yarn", 40.0, 64)
    assert (yarn.beta_fast, yarn.beta_slow, yarn.mscale, yarn.mscale_all_dim) == (16.0, 2.0, 0.9, 0.8)
    assert "rope_type" not in to_dict(tiny_config(**MLA, **YARN))


@pytest.mark.parametrize("extra", [MOE, MLA], ids=["moe", "mla"])
def test_tensor_parallel_switches_sequence_parallel_on_with_a_note(tiny_config, tmp_path: Path, extra: dict) -> None:
    config = tiny_config(**extra, tensor_model_parallel_size=2)
    with pytest.warns(SequenceParallelNote, match="sequence_parallel switched on"):
        config.finalize()
    assert config.sequence_parallel is True
    assert "sequence_parallel" not in to_dict(config), "never written into saved configs"
    assert "sequence_parallel" not in load(save(config, tmp_path / "c.json")).transformer_kwargs
    with warnings.catch_warnings():
        warnings.simplefilter("error", SequenceParallelNote)
        tiny_config(**extra, tensor_model_parallel_size=2, sequence_parallel=True).finalize()  # explicit: no note
        assert tiny_config(**extra).finalize().sequence_parallel is False  # TP=1: nothing to switch on


REJECTED = [
    # MoE: impossible
    ({**MOE, "num_moe_experts": 0}, "num_moe_experts", "positive integer"),
    ({**MOE, "moe_router_topk": 5}, "moe_router_topk", "between 1 and num_moe_experts=4"),
    ({**MOE, "num_moe_experts": 6, "expert_model_parallel_size": 4}, "expert_model_parallel_size", "num_moe_experts=6 must be divisible by expert_model_parallel_size=4"),
    ({**MOE, "num_moe_experts": 8, "moe_router_num_groups": 4, "moe_router_group_topk": 5}, "moe_router_group_topk", "between 1 and moe_router_num_groups=4"),
    ({**MOE, "num_moe_experts": 8, "moe_router_num_groups": 3, "moe_router_group_topk": 1}, "moe_router_num_groups", "divisible by moe_router_num_groups=3"),
    ({**MOE, "num_moe_experts": 8, "moe_router_num_groups": 4}, "moe_router_group_topk", "needs both"),
    ({**MOE, "num_moe_experts": 8, "moe_router_num_groups": 4, "moe_router_group_topk": 4}, "moe_router_group_topk", "moe_router_topk=2 >= moe_router_group_topk=4"),
    ({**MOE, "num_moe_experts": 8, "moe_router_topk": 6, "moe_router_num_groups": 4, "moe_router_group_topk": 2}, "moe_router_topk", "6 experts cannot be chosen from 2 groups of 2"),
    ({**MOE, "moe_router_score_function": "relu"}, "moe_router_score_function", "softmax, sigmoid"),
    ({**MOE, "moe_router_enable_expert_bias": True}, "moe_router_enable_expert_bias", "sigmoid"),
    ({**MOE, "moe_router_topk": 1}, "moe_router_pre_softmax", "zero gradient"),
    ({**MOE, "moe_router_load_balancing_type": "sinkhorn", "moe_aux_loss_coeff": 0.01}, "moe_aux_loss_coeff", "must be 0 with moe_router_load_balancing_type='sinkhorn'"),
    ({**MOE, "moe_router_load_balancing_type": "balanced"}, "moe_router_load_balancing_type", "aux_loss, seq_aux_loss"),
    ({**MOE, "moe_token_dispatcher_type": "ring"}, "moe_token_dispatcher_type", "allgather, alltoall, flex"),
    ({**MOE, "moe_pad_expert_input_to_capacity": True}, "moe_pad_expert_input_to_capacity", "capacity"),
    ({**MOE, "moe_expert_capacity_factor": -1.0}, "moe_expert_capacity_factor", "positive"),
    ({**MOE, "moe_token_drop_policy": "random"}, "moe_token_drop_policy", "'probs' or 'position'"),
    ({**MOE, "moe_router_dtype": "bf16"}, "moe_router_dtype", "'fp32' or 'fp64'"),
    ({**MOE, "moe_aux_loss_coeff": -0.1}, "moe_aux_loss_coeff", ">= 0"),
    ({**MOE, "expert_tensor_parallel_size": 3}, "moe_ffn_hidden_size", "64 must be divisible by expert_tensor_parallel_size=3"),
    ({**MOE, "expert_tensor_parallel_size": 2, "add_bias_linear": True}, "add_bias_linear", "expert_tensor_parallel_size=1"),
    ({**MOE, "moe_shared_expert_intermediate_size": 0}, "moe_shared_expert_intermediate_size", "positive multiple"),
    ({**MOE, "moe_shared_expert_gate": True}, "moe_shared_expert_gate", "needs a shared expert"),
    ({**MOE, "moe_shared_expert_intermediate_size": 32, "moe_shared_expert_overlap": True}, "moe_shared_expert_overlap", "alltoall dispatcher only"),
    ({**MOE, "moe_layer_freq": [1]}, "moe_layer_freq", "one 0 (dense) or 1 (MoE) per layer, 2 in all"),
    ({**MOE, "moe_layer_freq": [0, 0]}, "moe_layer_freq", "no MoE layer"),
    ({**MOE, "moe_layer_freq": 0}, "moe_layer_freq", ">= 1"),
    # MoE: silently ignored on a dense model
    ({"moe_router_topk": 4}, "moe_router_topk", "num_moe_experts is not set"),
    ({"expert_model_parallel_size": 2}, "expert_model_parallel_size", "num_moe_experts is not set"),
    # MoE: not on this machine (no CUDA, no transformer-engine / grouped_gemm / DeepEP)
    ({**MOE, "moe_grouped_gemm": True}, "moe_grouped_gemm", "grouped_gemm"),
    ({**MOE, "moe_permute_fusion": True}, "moe_permute_fusion", "transformer-engine fused kernel"),
    ({**MOE, "moe_router_fusion": True}, "moe_router_fusion", "transformer-engine fused kernel"),
    ({**MOE, "moe_token_dispatcher_type": "flex"}, "moe_token_dispatcher_type", "DeepEP"),
    ({**MOE, "moe_enable_deepep": True}, "moe_enable_deepep", "DeepEP"),
    # tensor parallelism
    ({**MOE, "tensor_model_parallel_size": 2, "sequence_parallel": False}, "sequence_parallel", "megatron refuses MoE without it"),
    ({**MOE, "tensor_model_parallel_size": 2, "layer_spec": "local"}, "layer_spec", "refuse sequence parallelism"),
    # MLA
    ({"q_lora_rank": 64}, "q_lora_rank", "only applies with multi_latent_attention=True"),
    ({**MLA, "rope_type": "rope"}, "rope_type", "position_embedding_type"),
    ({**MLA, "mscale_all_dim": 1.0}, "mscale_all_dim", "yarn_mscale_all_dim"),
    ({**MLA, "position_embedding_type": "learned_absolute"}, "position_embedding_type", "'rope' or 'yarn'"),
    ({**MLA, "num_query_groups": 2}, "num_query_groups", "no query groups"),
    ({**MLA, "kv_channels": 16}, "kv_channels", "qk_head_dim"),
    ({**MLA, "qk_pos_emb_head_dim": 7}, "qk_pos_emb_head_dim", "7 rotary channels; RoPE needs an even number"),
    ({**MLA, "kv_lora_rank": 0}, "kv_lora_rank", "positive integer"),
    ({**MLA, "q_lora_rank": 0}, "q_lora_rank", "positive integer or null"),
    ({**MLA, "rotary_interleaved": True}, "rotary_interleaved", "de-interleaves"),
    ({**MLA, **YARN, "yarn_correction_range_round_to_int": False}, "yarn_correction_range_round_to_int", "ignored"),
    ({**MLA, "attention_output_gate": True}, "attention_output_gate", "not supported"),
    ({**MLA, "cache_mla_latents": True}, "cache_mla_latents", "inference"),
    ({**MLA, "apply_rope_fusion": True}, "apply_rope_fusion", "triton"),
    # MLA: wrong gradients (measured), refused
    ({**MLA, "tensor_model_parallel_size": 2, "layer_spec": "local"}, "layer_spec", "wrong gradients"),
    ({**MLA, "tensor_model_parallel_size": 2, "sequence_parallel": False}, "sequence_parallel", "MLA without it gives wrong gradients"),
]


@pytest.mark.parametrize("overrides,field,message", REJECTED, ids=[f"{r[1]}-{i}" for i, r in enumerate(REJECTED)])
def test_finalize_rejects(tiny_config, overrides: dict, field: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        tiny_config(**overrides).finalize()
    assert caught.value.field == field, caught.value
    assert message in caught.value.rule, caught.value
    assert f"'GPTModelConfig.{field}'" in str(caught.value)


ACCEPTED = [
    {**MOE, "moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True},
    {**MOE, "num_moe_experts": 8, "moe_router_num_groups": 4, "moe_router_group_topk": 2, "moe_router_topk": 4},
    {**MOE, "moe_router_topk": 1, "moe_router_pre_softmax": True},
    {**MOE, "moe_expert_capacity_factor": 1.0, "moe_pad_expert_input_to_capacity": True, "moe_token_drop_policy": "position"},
    {**MOE, "moe_router_load_balancing_type": ["aux_loss", "seq_aux_loss"], "moe_aux_loss_coeff": [0.01, 0.001]},
    {**MOE, "moe_layer_freq": 2, "num_layers": 4},
    {**MOE, "expert_model_parallel_size": 4, "expert_tensor_parallel_size": 2},
    {**MOE, "moe_shared_expert_intermediate_size": 32, "moe_shared_expert_overlap": True, "moe_token_dispatcher_type": "alltoall"},
    {"moe_router_topk": 2, "expert_model_parallel_size": 1},  # megatron's defaults, written out: harmless
    {**MLA, "q_lora_rank": None},
    {**MLA, **YARN, **MOE, "mtp_num_layers": 1},
]


@pytest.mark.parametrize("overrides", ACCEPTED)
def test_finalize_accepts(tiny_config, overrides: dict) -> None:
    assert tiny_config(**overrides).finalize().transformer is not None


@pytest.mark.parametrize("field,modules", [
    ("moe_grouped_gemm", {"transformer_engine"}), ("moe_grouped_gemm", {"grouped_gemm"}),
    ("moe_permute_fusion", {"transformer_engine"}), ("moe_router_fusion", {"transformer_engine"}),
])
def test_fused_paths_are_accepted_where_they_exist(tiny_config, monkeypatch, field: str, modules: set) -> None:
    """The refusal is about this machine, not the config: with the package and CUDA the rule passes."""
    monkeypatch.setattr(availability, "module_present", lambda module: module in modules)
    monkeypatch.setattr(availability, "cuda_present", lambda: True)
    tiny_config(**MOE, **{field: True}).validate()
    monkeypatch.setattr(availability, "cuda_present", lambda: False)
    with pytest.raises(ConfigError, match="CUDA is not available"):
        tiny_config(**MOE, **{field: True}).validate()
