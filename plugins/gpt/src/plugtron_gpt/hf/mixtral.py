"""``MixtralForCausalLM``: Mistral's attention, every layer a MoE block of SwiGLU experts.

On disk the block is ``block_sparse_moe`` with experts ``w1`` (gate), ``w3``
(up) and ``w2`` (down) and router ``gate``; the experts are as wide as
``intermediate_size`` (there is no separate expert width). Mixtral always
renormalises the top-k softmax probabilities (no ``norm_topk_prob`` key), which
is megatron's default routing (``moe_router_pre_softmax=False``). Its
``sliding_window`` applies to every layer (megatron's ``window_size``), as Mistral's.
``router_jitter_noise`` multiplies the router input by uniform noise in
``[1 - eps, 1 + eps]`` while training only. megatron's ``moe_input_jitter_eps``
is the same noise but applied in evaluation too (``router.py``: no
``self.training`` check), so translating it would change inference logits
(measured: 0.12 at eps 0.1): it is read as a training-only setting and not
translated; export writes megatron's value back. The class's default RoPE base is 1e6.
"""

from __future__ import annotations

from typing import Any

from plugtron.conversion import INT, ConfigReader, ConfigSchema

from .adapter import GPTAdapter
from .architecture import Fields
from .llama import WINDOW, head_dim_of, read_decoder, read_uniform_window, uniform_window_to_hf, write_decoder
from .mistral import MISTRAL
from .qwen3_moe import MOE_TYPES, derive_experts, expert_rules, moe_table, read_moe, write_moe
from .rope import need_value, rope_fields_from_hf

ROPE_THETA = 1e6


def _read(k: ConfigReader) -> Fields:
    fields = {**read_decoder(k, add_bias_linear=False, add_qkv_bias=False, qk_layernorm=False),
              **read_uniform_window(k, k.get("num_hidden_layers"))}
    fields.update(rope_fields_from_hf(k.raw, k.fail, fields["seq_length"], k.architecture, rope_theta_default=ROPE_THETA))
    k.mark("router_jitter_noise")  # training-only (see the module docstring)
    return read_moe(k, fields, experts_key="num_local_experts", alias="num_experts", ffn_key=None, norm_topk=True)


def _write(f: Fields) -> dict[str, Any]:
    arch = MIXTRAL.name
    need_value(f, "add_bias_linear", (False,), arch, True)
    need_value(f, "add_qkv_bias", (False,), arch, False)
    return {**write_decoder(f, arch, qk_layernorm=False), "head_dim": head_dim_of(f),
            "sliding_window": uniform_window_to_hf(f, arch),
            "router_jitter_noise": float(f.get("moe_input_jitter_eps") or 0.0),
            **write_moe(f, arch, experts_key="num_local_experts", ffn_key=None, norm_key=None, sparse_keys=False)}


def _derive(values: dict[str, Any]) -> None:
    """MixtralConfig fills ``num_key_value_heads`` only (``head_dim`` stays None: the attention computes it)."""
    derive_experts("num_local_experts", "num_experts")(values)
    if values["num_key_value_heads"] is None:
        values["num_key_value_heads"] = values["num_attention_heads"]


MIXTRAL = MISTRAL.derive(
    name="MixtralForCausalLM", model_type="mixtral", config_class="MixtralConfig", read=_read, write=_write,
    table=moe_table(MISTRAL.table, expert_rules("block_sparse_moe", gate="w1", up="w3", down="w2")),
    schema=ConfigSchema(
        defaults={"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": None, "hidden_act": "silu",
                  "max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                  "sliding_window": None, "num_experts_per_tok": 2, "num_local_experts": 8,
                  "output_router_logits": False, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0},
        types={**MOE_TYPES, "num_key_value_heads": INT}, derive=_derive),
    expresses=WINDOW | {"num_moe_experts"})

ADAPTER = GPTAdapter(MIXTRAL)
