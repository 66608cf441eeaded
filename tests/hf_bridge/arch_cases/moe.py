"""Qwen3-MoE, Mixtral, OLMoE and Qwen2-MoE: tiny configs that switch on each architecture's MoE features.

Four experts (two per rank at EP=2), top-2 routing. Qwen3-MoE renormalises the top-k
probabilities (``norm_topk_prob``) and has a dense layer (``mlp_only_layers``) and a
``head_dim`` other than hidden / heads; Qwen2-MoE has MoE only on every second layer
(``decoder_sparse_step=2``), q/k/v biases and the sigmoid-gated shared expert; OLMoE has
full-width q/k norms and pre-softmax routing; Mixtral's experts are ``intermediate_size``
wide and it windows every layer (``sliding_window`` 8, shorter than the parity sequences);
Qwen2-MoE windows layers 0 and 2 (``max_window_layers``). Mixtral's ``router_jitter_noise``
acts in training only (no effect on parity). Odd vocabularies force megatron's vocab padding.
"""

from __future__ import annotations

from arch_cases import Case

SMALL = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 64, "num_experts_per_tok": 2}

QWEN3_MOE = Case("qwen3_moe", "Qwen3MoeForCausalLM", {
    **SMALL, "vocab_size": 97, "head_dim": 24, "num_experts": 4, "moe_intermediate_size": 32,
    "norm_topk_prob": True, "mlp_only_layers": [1], "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}})

MIXTRAL = Case("mixtral", "MixtralForCausalLM", {
    **SMALL, "vocab_size": 99, "intermediate_size": 48, "num_local_experts": 4, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True, "router_jitter_noise": 0.1, "sliding_window": 8,
    "rope_parameters": {"rope_type": "default", "rope_theta": 20000.0}})

OLMOE = Case("olmoe", "OlmoeForCausalLM", {
    **SMALL, "vocab_size": 101, "intermediate_size": 32, "num_experts": 4, "norm_topk_prob": False,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "pad_token_id": 1, "eos_token_id": 2,
    "rope_parameters": {"rope_type": "default", "rope_theta": 3000.0}})

QWEN2_MOE = Case("qwen2_moe", "Qwen2MoeForCausalLM", {
    **SMALL, "vocab_size": 103, "num_experts": 4, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 48, "decoder_sparse_step": 2, "norm_topk_prob": False, "qkv_bias": True,
    "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 3,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 7000.0}})

CASES = [QWEN3_MOE, MIXTRAL, OLMOE, QWEN2_MOE]
