"""``Qwen2MoeForCausalLM`` (Qwen1.5-MoE, Qwen2-MoE): Qwen2's attention, routed experts plus a gated shared expert.

Each MoE block adds ``sigmoid(shared_expert_gate(x)) * shared_expert(x)`` to the
routed experts' output. megatron-core 0.16.1 computes exactly that with
``moe_shared_expert_gate=True``: ``SharedExpertMLP`` holds ``gate_weight``
``[1, hidden]`` and multiplies its output by ``sigmoid(x @ gate_weight.T)``
(``transformer/moe/shared_experts.py``), so the shared expert is converted,
not refused. ``qkv_bias`` biases q/k/v only (megatron's ``add_qkv_bias``);
dense layers (``mlp_only_layers``, ``decoder_sparse_step``) keep
``intermediate_size``; routed experts are ``moe_intermediate_size`` wide.
With ``use_sliding_window`` the window acts on the layers ``layer_types``
calls sliding (by default every other layer below ``max_window_layers``):
megatron's ``window_size`` plus a per-layer ``window_attn_skip_freq``.
"""

from __future__ import annotations

from typing import Any

from plugtron.conversion import BOOL, ConfigReader, ConfigSchema, direct, gated_fc1

from .adapter import GPTAdapter
from .architecture import Fields
from .llama import (FULL, SLIDING, WINDOW, head_dim_of, layer_types_of, read_decoder, window_fields, windowed_layers,
                    write_decoder)
from .qwen2 import QWEN2
from .qwen3_moe import MOE_TYPES, expert_rules, moe_pattern, moe_table, read_moe, write_moe
from .rope import need_value

SHARED_EXPERT = [
    gated_fc1("mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight",
              "mlp.shared_experts.linear_fc1.weight", ("FS", "H")),
    direct("mlp.shared_expert.down_proj.weight", "mlp.shared_experts.linear_fc2.weight", ("H", "FS")),
    direct("mlp.shared_expert_gate.weight", "mlp.shared_experts.gate_weight", (1, "H")),
]


def _derive(values: dict[str, Any]) -> None:
    """Qwen2MoeConfig: window 0 unless ``use_sliding_window``; every other layer below ``max_window_layers`` slides."""
    if values["mlp_only_layers"] is None:
        values["mlp_only_layers"] = []
    if not values["use_sliding_window"]:
        values["sliding_window"] = 0
    if values["layer_types"] is None:
        values["layer_types"] = [
            "sliding_attention" if (i + 1) % 2 and i < values["max_window_layers"] and values["use_sliding_window"]
            else "full_attention" for i in range(values["num_hidden_layers"])]


def _read(k: ConfigReader) -> Fields:
    layers = k.get("num_hidden_layers")
    k.mark("use_sliding_window", "max_window_layers")  # they act through the derived sliding_window / layer_types
    types = layer_types_of(k, layers)
    window = window_fields(k, k.get("sliding_window"), [t == SLIDING for t in types])
    bias = k.get("qkv_bias")
    fields = read_decoder(k, add_bias_linear=False, add_qkv_bias=bias, qk_layernorm=False)
    fields = read_moe(k, fields, experts_key="num_experts", alias=None, ffn_key="moe_intermediate_size",
                      pattern=moe_pattern(k, layers))
    shared = k.get("shared_expert_intermediate_size")
    if shared < 1:
        raise k.fail("shared_expert_intermediate_size", f"is {shared}; Qwen2-MoE always has a shared expert")
    return {**fields, **window, "moe_shared_expert_intermediate_size": shared, "moe_shared_expert_gate": True}


def _write(f: Fields) -> dict[str, Any]:
    arch = QWEN2_MOE.name
    need_value(f, "add_bias_linear", (False,), arch, True)
    need_value(f, "moe_shared_expert_gate", (True,), arch, False)
    shared = f.get("moe_shared_expert_intermediate_size")
    if not shared:
        need_value(f, "moe_shared_expert_intermediate_size", (), arch)
    window, windowed = windowed_layers(f, arch)
    out = {**write_decoder(f, arch, qk_layernorm=False), "use_sliding_window": window is not None,
           "sliding_window": window, "layer_types": [SLIDING if w else FULL for w in windowed],
           "qkv_bias": bool(f.get("add_qkv_bias")), "shared_expert_intermediate_size": shared,
           **write_moe(f, arch, experts_key="num_experts", ffn_key="moe_intermediate_size", shared=True)}
    if head_dim_of(f) != f["hidden_size"] // f["num_attention_heads"]:
        out["head_dim"] = head_dim_of(f)  # not a Qwen2MoeConfig field; its attention reads it when present
    return out


QWEN2_MOE = QWEN2.derive(
    name="Qwen2MoeForCausalLM", model_type="qwen2_moe", config_class="Qwen2MoeConfig", read=_read, write=_write,
    table=moe_table(QWEN2.table, expert_rules() + SHARED_EXPERT),
    schema=ConfigSchema(
        defaults={"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24,
                  "num_attention_heads": 16, "num_key_value_heads": 16, "hidden_act": "silu",
                  "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                  "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28,
                  "decoder_sparse_step": 1, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
                  "num_experts_per_tok": 4, "num_experts": 60, "norm_topk_prob": False,
                  "output_router_logits": False, "router_aux_loss_coef": 0.001, "mlp_only_layers": None,
                  "qkv_bias": True, "layer_types": None},
        types={**MOE_TYPES, "qkv_bias": BOOL}, derive=_derive),
    expresses=WINDOW | {"num_moe_experts"})

ADAPTER = GPTAdapter(QWEN2_MOE)
