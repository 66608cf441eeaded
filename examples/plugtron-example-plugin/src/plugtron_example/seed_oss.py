"""``SeedOssForCausalLM`` (ByteDance Seed-OSS) from a package of its own: Llama with q/k/v biases."""

from plugtron.conversion import ConfigSchema
from plugtron_gpt.hf.adapter import GPTAdapter
from plugtron_gpt.hf.llama import DEFAULTS, LLAMA, derive_heads, head_dim_of, read_decoder, write_decoder


def read(k):
    for key in ("attention_out_bias", "mlp_bias"):  # megatron's one add_bias_linear cannot set them apart
        if k.get(key):
            raise k.fail(key, "is true; only q/k/v biases (attention_bias) are supported")
    return read_decoder(k, add_bias_linear=False, add_qkv_bias=k.get("attention_bias"), qk_layernorm=False)


def write(f):
    return {**write_decoder(f, SEED_OSS.name, qk_layernorm=False), "head_dim": head_dim_of(f),
            "attention_bias": f["add_qkv_bias"], "attention_out_bias": False, "mlp_bias": False}


SEED_OSS = LLAMA.derive(
    name="SeedOssForCausalLM", model_type="seed_oss", config_class="SeedOssConfig", read=read, write=write,
    schema=ConfigSchema(
        defaults={**DEFAULTS, "vocab_size": 155136, "intermediate_size": 27648, "num_hidden_layers": 64,
                  "num_attention_heads": 80, "num_key_value_heads": 8, "max_position_embeddings": 524288,
                  "attention_bias": True, "attention_out_bias": False, "mlp_bias": False, "head_dim": 128},
        derive=derive_heads, non_numeric=frozenset({"pretraining_tp", "residual_dropout"})))

ADAPTER = GPTAdapter(SEED_OSS)
