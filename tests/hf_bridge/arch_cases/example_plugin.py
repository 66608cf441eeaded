"""The example plugin's third-party architecture (examples/plugtron-example-plugin, Seed-OSS)."""

from arch_cases import Case

CASES = [
    Case("seed_oss", "SeedOssForCausalLM", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=99, max_position_embeddings=64, attention_bias=True, tie_word_embeddings=False)),
]
