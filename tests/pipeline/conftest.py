import warnings

import pytest
import torch

warnings.filterwarnings("ignore", module=r"megatron\.")


def tiny_gpt(**overrides):
    from plugtron_gpt.config import GPTModelConfig

    fields = dict(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
        vocab_size=128, make_vocab_size_divisible_by=64, seq_length=16, normalization="RMSNorm",
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, layer_spec="local",
    )
    fields.update(overrides)
    return GPTModelConfig(**fields)


@pytest.fixture
def gpt_config():
    return tiny_gpt
