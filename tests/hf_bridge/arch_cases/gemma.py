"""Gemma, Gemma 2 and Gemma 3 (text): tiny configs that switch on each generation's features.

Every case has ``head_dim`` 24, not ``hidden / heads`` = 16, and an odd vocabulary
(megatron pads it). Gemma 2 and 3 set ``query_pre_attn_scalar`` away from
``head_dim``, caps low enough that ``tanh`` bends the values they cap, and a
sliding window of 5 under 16-token sequences; Gemma 2 types its layers
irregularly (``window_attn_skip_freq`` as a list) and unties the output layer;
Gemma 3 keeps the every-other-layer pattern, a local RoPE base far from the global
one and linear RoPE scaling on the global layers only.
"""

from __future__ import annotations

from arch_cases import Case

SMALL = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 24, "max_position_embeddings": 64}

GEMMA = Case("gemma", "GemmaForCausalLM", {
    **SMALL, "vocab_size": 101, "rms_norm_eps": 1e-5, "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}})

GEMMA2 = Case("gemma2", "Gemma2ForCausalLM", {
    **SMALL, "vocab_size": 103, "tie_word_embeddings": False, "rope_parameters": {"rope_type": "default", "rope_theta": 300.0},
    "query_pre_attn_scalar": 36, "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0, "sliding_window": 5,
    "layer_types": ["sliding_attention", "full_attention", "full_attention", "sliding_attention"]}, seq=16)

GEMMA3 = Case("gemma3", "Gemma3ForCausalLM", {
    **SMALL, "vocab_size": 107, "query_pre_attn_scalar": 16, "final_logit_softcapping": 3.0, "sliding_window": 5,
    "sliding_window_pattern": 2, "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 20.0},
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0}}}, seq=16)

CASES = [GEMMA, GEMMA2, GEMMA3]
