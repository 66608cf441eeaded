"""DeepSeek-V3 (also Kimi-K2 / Moonlight) and DeepSeek-V2: tiny configs that switch on each feature.

DeepSeek-V3: MLA with a compressed query (``q_lora_rank``), YaRN with distinct
``mscale`` / ``mscale_all_dim``, one dense layer then MoE (``first_k_dense_replace``),
eight experts in four groups (two kept, so HF's top-2 group score is megatron's),
sigmoid routing with ``e_score_correction_bias`` and ``routed_scaling_factor``, one
shared expert, four layers (PP=2 splits them). DeepSeek-V2: MLA without ``q_lora_rank``, softmax top-3 without
renormalisation, group-limited greedy routing (two of four groups, scored by their best expert), two shared experts. Moonlight-like:
DeepSeek-V3 without ``q_lora_rank``, plain RoPE, one group. GLM-4.5: q/k/v biases, per-head
q/k norms, half-rotary RoPE, ``head_dim`` other than hidden / heads, the DeepSeek-V3 router over
two groups. Odd vocabularies force padding.
"""

from __future__ import annotations

from arch_cases import Case

MLA = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
       "num_key_value_heads": 4, "max_position_embeddings": 64, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
       "qk_rope_head_dim": 8, "v_head_dim": 12, "moe_intermediate_size": 24, "first_k_dense_replace": 1,
       "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.9, "mscale_all_dim": 0.8}

DEEPSEEK_V3 = Case("deepseek_v3", "DeepseekV3ForCausalLM", {
    **MLA, "num_hidden_layers": 4, "vocab_size": 97, "q_lora_rank": 24, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 4,
    "topk_group": 1, "n_shared_experts": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
    "rope_interleave": True, "rope_parameters": YARN})

MOONLIGHT = Case("deepseek_v3_moonlight", "DeepseekV3ForCausalLM", {
    **MLA, "vocab_size": 101, "q_lora_rank": None, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 1,
    "topk_group": 1, "n_shared_experts": 2, "routed_scaling_factor": 1.7, "norm_topk_prob": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0}}, tp2=False, pp2=False)

DEEPSEEK_V2 = Case("deepseek_v2", "DeepseekV2ForCausalLM", {
    **MLA, "vocab_size": 99, "q_lora_rank": None, "n_routed_experts": 8, "num_experts_per_tok": 3, "n_group": 4,
    "topk_group": 2, "topk_method": "group_limited_greedy", "n_shared_experts": 2, "routed_scaling_factor": 1.5,
    "norm_topk_prob": False, "rope_parameters": YARN}, pp2=False)

GLM4_MOE = Case("glm4_moe", "Glm4MoeForCausalLM", {
    "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 24, "max_position_embeddings": 64, "vocab_size": 103,
    "attention_bias": True, "use_qk_norm": True, "moe_intermediate_size": 24, "first_k_dense_replace": 1,
    "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "n_shared_experts": 1,
    "routed_scaling_factor": 1.8, "norm_topk_prob": True, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 20000.0, "partial_rotary_factor": 0.5}})

CASES = [DEEPSEEK_V3, MOONLIGHT, DEEPSEEK_V2, GLM4_MOE]
