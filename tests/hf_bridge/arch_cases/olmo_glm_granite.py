"""OLMo 2, GLM, GLM-4-0414 and Granite: tiny configs that switch on each architecture's features.

Odd vocabularies force megatron's vocab padding; GLM's ``head_dim`` 24 differs from
``hidden / heads`` and its rotary half (12 channels) is not a power of two; GLM-4 ties its
embeddings; Granite sets every multiplier away from 1 (and ``attention_multiplier`` away
from ``head_dim ** -0.5``).
"""

from __future__ import annotations

from arch_cases import Case

SMALL = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 64}

OLMO2 = Case("olmo2", "Olmo2ForCausalLM", {
    **SMALL, "vocab_size": 97, "pad_token_id": None, "eos_token_id": None, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}})

GLM = Case("glm", "GlmForCausalLM", {
    **SMALL, "vocab_size": 99, "pad_token_id": None, "head_dim": 24, "attention_bias": True, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000.0, "partial_rotary_factor": 0.5}})

GLM4 = Case("glm4", "Glm4ForCausalLM", {
    **SMALL, "vocab_size": 101, "pad_token_id": None, "head_dim": 16, "attention_bias": True, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000.0, "partial_rotary_factor": 0.5}})

GRANITE = Case("granite", "GraniteForCausalLM", {
    **SMALL, "vocab_size": 103, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
    "embedding_multiplier": 0.5, "residual_multiplier": 0.5, "attention_multiplier": 0.5, "logits_scaling": 2.5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 2000.0}})

CASES = [OLMO2, GLM, GLM4, GRANITE]
