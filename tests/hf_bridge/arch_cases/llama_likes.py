"""Llama-like architectures (StableLM, StarCoder2, Nemotron, ERNIE 4.5, SmolLM3, Phi-3) and the sliding
windows of Mistral / Qwen2 / Qwen3. Every case switches on what its architecture adds to Llama; windows
are shorter than ``seq`` so they cut attention."""

from __future__ import annotations

from . import Case

SEQ = 16
SMALL = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 64}

CASES = [
    Case("stablelm", "StableLmForCausalLM",
         {**SMALL, "vocab_size": 97, "use_qkv_bias": True, "layer_norm_eps": 1e-4,
          "rope_parameters": {"rope_type": "default", "rope_theta": 1000.0, "partial_rotary_factor": 0.5}}),
    Case("starcoder2", "Starcoder2ForCausalLM",
         {**SMALL, "vocab_size": 101, "use_bias": True, "sliding_window": 5, "norm_epsilon": 1e-4,
          "rope_parameters": {"rope_type": "default", "rope_theta": 1000.0}}, seq=SEQ),
    Case("nemotron", "NemotronForCausalLM",
         {**SMALL, "vocab_size": 99, "head_dim": 24, "norm_eps": 1e-4, "attention_bias": True, "mlp_bias": True,
          "rope_parameters": {"rope_type": "default", "rope_theta": 1000.0, "partial_rotary_factor": 0.5}}),
    Case("ernie4_5", "Ernie4_5ForCausalLM",
         {**SMALL, "vocab_size": 103, "head_dim": 16, "use_bias": True, "tie_word_embeddings": False,
          "rope_parameters": {"rope_type": "default", "rope_theta": 1000.0}}),
    Case("smollm3", "SmolLM3ForCausalLM",
         {**SMALL, "vocab_size": 98, "no_rope_layers": [1, 0, 1, 0], "use_sliding_window": True, "sliding_window": 5,
          "layer_types": ["full_attention", "sliding_attention", "full_attention", "full_attention"],
          "tie_word_embeddings": False, "rope_parameters": {"rope_type": "default", "rope_theta": 1000.0}}, seq=SEQ),
    Case("phi3", "Phi3ForCausalLM",
         {**SMALL, "vocab_size": 95, "sliding_window": 6,
          "rope_parameters": {"rope_type": "default", "rope_theta": 1000.0, "partial_rotary_factor": 0.75}}, seq=SEQ),
    Case("mistral_window", "MistralForCausalLM",
         {**SMALL, "vocab_size": 93, "sliding_window": 5, "rope_parameters": {"rope_type": "default", "rope_theta": 1000.0}},
         seq=SEQ),
    Case("qwen2_window", "Qwen2ForCausalLM",
         {**SMALL, "vocab_size": 91, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1,
          "rope_parameters": {"rope_type": "default", "rope_theta": 1000.0}}, seq=SEQ),
    Case("qwen3_window", "Qwen3ForCausalLM",
         {**SMALL, "vocab_size": 89, "head_dim": 16, "use_sliding_window": True, "sliding_window": 5,
          "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
          "rope_parameters": {"rope_type": "default", "rope_theta": 1000.0}}, seq=SEQ),
]
