"""Qwen3-MoE, Mixtral, OLMoE and Qwen2-MoE, single process: published config.json files, fields that matter,
refusals by name, the per-expert tensor table, and the expert layout flags.

Parity (TP=1, TP=2, PP=2) and the bit-exact round trips run through the shared harness
(``arch_cases/moe.py``) and ``test_moe_multirank.py`` (expert-parallel layouts).
"""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from arch_cases import field_matters
from arch_cases.moe import MIXTRAL, OLMOE, QWEN2_MOE, QWEN3_MOE
from plugtron.conversion import UnsupportedConfigError
from plugtron_gpt.hf import catalogue

# -- config.json files as published on the hub ------------------------------------------------------
QWEN3_30B_A3B = {  # Qwen/Qwen3-30B-A3B
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 40960,
    "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768,
    "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936}
MIXTRAL_8X7B = {  # mistralai/Mixtral-8x7B-v0.1
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32, "num_experts_per_tok": 2,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": False,
    "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.36.0.dev0", "use_cache": True,
    "vocab_size": 32000}
OLMOE_1B_7B = {  # allenai/OLMoE-1B-7B-0924
    "architectures": ["OlmoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "clip_qkv": None,
    "eos_token_id": 50279, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 1024, "max_position_embeddings": 4096, "model_type": "olmoe", "norm_topk_prob": False,
    "num_attention_heads": 16, "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 16,
    "num_key_value_heads": 16, "output_router_logits": False, "pad_token_id": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "rope_theta": 10000.0, "router_aux_loss_coef": 0.01, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 50304}
QWEN15_MOE_A27B = {  # Qwen/Qwen1.5-MoE-A2.7B
    "architectures": ["Qwen2MoeForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 5632, "max_position_embeddings": 8192, "max_window_layers": 21, "model_type": "qwen2_moe",
    "num_attention_heads": 16, "num_hidden_layers": 24, "num_key_value_heads": 16, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.39.0.dev0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
    "decoder_sparse_step": 1, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
    "num_experts_per_tok": 4, "num_experts": 60, "norm_topk_prob": False, "output_router_logits": False,
    "router_aux_loss_coef": 0.001}

PUBLISHED = [
    ("Qwen3-30B-A3B", QWEN3_30B_A3B, {"num_moe_experts": 128, "moe_router_topk": 8, "moe_router_pre_softmax": False,
                                      "moe_ffn_hidden_size": 768, "kv_channels": 128, "qk_layernorm": True,
                                      "moe_layer_freq": 1, "rotary_base": 1000000.0}),
    ("Mixtral-8x7B-v0.1", MIXTRAL_8X7B, {"num_moe_experts": 8, "moe_router_topk": 2, "moe_router_pre_softmax": False,
                                         "moe_ffn_hidden_size": 14336, "num_query_groups": 8, "rotary_base": 1e6}),
    ("OLMoE-1B-7B-0924", OLMOE_1B_7B, {"num_moe_experts": 64, "moe_router_topk": 8, "moe_router_pre_softmax": True,
                                       "moe_ffn_hidden_size": 1024, "qk_layernorm": True, "qk_norm_scope": "full"}),
    ("Qwen1.5-MoE-A2.7B", QWEN15_MOE_A27B, {"num_moe_experts": 60, "moe_router_topk": 4,
                                            "moe_router_pre_softmax": True, "moe_ffn_hidden_size": 1408,
                                            "moe_shared_expert_intermediate_size": 5632, "moe_shared_expert_gate": True,
                                            "add_qkv_bias": True, "ffn_hidden_size": 5632}),
]


def fields_of(cfg: dict[str, Any]) -> dict[str, Any]:
    return catalogue.to_megatron_fields(cfg)


@pytest.mark.parametrize("model,cfg,expected", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_published_configs_translate(model, cfg, expected) -> None:
    fields = fields_of(cfg)
    assert {k: fields[k] for k in expected} == expected
    exported = catalogue.from_megatron_fields(fields, cfg["architectures"][0], passthrough=cfg)
    assert fields_of(exported) == fields


# -- fields that matter -----------------------------------------------------------------------------
MATTERS = [(QWEN3_MOE, "norm_topk_prob", False), (QWEN3_MOE, "num_experts_per_tok", 3),
           (QWEN3_MOE, "mlp_only_layers", [1, 2]), (MIXTRAL, "num_experts_per_tok", 1),
           (OLMOE, "norm_topk_prob", True), (QWEN2_MOE, "decoder_sparse_step", 1), (QWEN2_MOE, "norm_topk_prob", True)]


@pytest.mark.parametrize("case,key,value", MATTERS, ids=[f"{c.name}-{k}" for c, k, _ in MATTERS])
def test_translated_field_moves_transformers_logits(tmp_path, case, key, value) -> None:
    assert field_matters(tmp_path, case, key, value) > 1e-3


WINDOWS = [(QWEN3_MOE, {"use_sliding_window": True, "sliding_window": 16}, [15, 0], None),
           (QWEN3_MOE, {"use_sliding_window": False, "sliding_window": 16}, None, None),
           (MIXTRAL, {"sliding_window": 8}, [7, 0], None),
           (QWEN2_MOE, {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 3}, [7, 0], [1, 0, 1, 0])]


@pytest.mark.parametrize("case,changes,window,per_layer", WINDOWS, ids=["qwen3_moe", "qwen3_moe-off", "mixtral", "qwen2_moe"])
def test_sliding_windows_translate_both_ways(case, changes, window, per_layer) -> None:
    fields = fields_of(_cfg(case, **changes))
    assert fields.get("window_size") == window and fields.get("window_attn_skip_freq") == per_layer
    assert fields_of(catalogue.from_megatron_fields(fields, case.architecture)) == fields


def test_moe_layers_follow_transformers_pattern() -> None:
    """HF counts ``(i + 1) % decoder_sparse_step``; megatron's integer frequency counts ``i % n``: a list."""
    fields = fields_of({**QWEN2_MOE.config, "architectures": ["Qwen2MoeForCausalLM"], "num_hidden_layers": 6,
                        "decoder_sparse_step": 2, "mlp_only_layers": [3]})
    assert fields["moe_layer_freq"] == [0, 1, 0, 0, 0, 1]
    out = catalogue.from_megatron_fields(fields, "Qwen2MoeForCausalLM")
    assert out["decoder_sparse_step"] == 1 and out["mlp_only_layers"] == [0, 2, 3, 4]


# -- refusals ---------------------------------------------------------------------------------------
def _cfg(case: Any, **changes: Any) -> dict[str, Any]:
    return {**case.config, "architectures": [case.architecture], **changes}


REFUSED = [
    ("qwen3_moe attention_bias", _cfg(QWEN3_MOE, attention_bias=True), "attention_bias", "o_proj"),
    ("top-k above experts", _cfg(QWEN3_MOE, num_experts_per_tok=5), "num_experts_per_tok", "between 1 and"),
    ("top-1 renormalised", _cfg(QWEN3_MOE, num_experts_per_tok=1), "norm_topk_prob", "top-1"),
    ("experts spelt twice", _cfg(QWEN3_MOE, num_local_experts=8), "num_local_experts", "pick one"),
    ("no MoE layer", _cfg(QWEN3_MOE, mlp_only_layers=[0, 1, 2, 3]), "mlp_only_layers", "no MoE layer"),
    ("olmoe clip_qkv", _cfg(OLMOE, clip_qkv=8.0), "clip_qkv", "clamp"),
    ("olmoe attention_bias", _cfg(OLMOE, attention_bias=True), "attention_bias", "MLP"),
    ("olmoe head_dim", _cfg(OLMOE, head_dim=8), "head_dim", "q/k norms"),
    ("qwen2_moe window of 0", _cfg(QWEN2_MOE, sliding_window=0), "sliding_window", "positive"),
    ("qwen3_moe layer_types", _cfg(QWEN3_MOE, layer_types=["full_attention"] * 4), "layer_types", "unknown"),
    ("qwen2_moe num_local_experts", _cfg(QWEN2_MOE, num_local_experts=4), "num_local_experts", "unknown"),
    ("qwen2_moe no shared expert", _cfg(QWEN2_MOE, shared_expert_intermediate_size=0),
     "shared_expert_intermediate_size", "shared expert"),
    ("mixtral top-1", _cfg(MIXTRAL, num_experts_per_tok=1), "num_experts_per_tok", "top-1"),
]


@pytest.mark.parametrize("cfg,field,words", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_what_megatron_cannot_express_is_refused_by_name(cfg, field, words) -> None:
    with pytest.raises(UnsupportedConfigError) as info:
        fields_of(cfg)
    assert info.value.field == field and words in str(info.value), str(info.value)


EXPORT_REFUSED = [
    ("MixtralForCausalLM", MIXTRAL, {"moe_router_pre_softmax": True}, "moe_router_pre_softmax"),
    ("MixtralForCausalLM", MIXTRAL, {"moe_layer_freq": [1, 0, 1, 1]}, "moe_layer_freq"),
    ("OlmoeForCausalLM", OLMOE, {"moe_router_score_function": "sigmoid"}, "moe_router_score_function"),
    ("Qwen3MoeForCausalLM", QWEN3_MOE, {"moe_shared_expert_intermediate_size": 64}, "moe_shared_expert_intermediate_size"),
    ("Qwen3MoeForCausalLM", QWEN3_MOE, {"moe_router_topk_scaling_factor": 2.5}, "moe_router_topk_scaling_factor"),
    ("Qwen2MoeForCausalLM", QWEN2_MOE, {"moe_shared_expert_gate": False}, "moe_shared_expert_gate"),
    ("LlamaForCausalLM", QWEN3_MOE, {}, "num_moe_experts"),
]


@pytest.mark.parametrize("arch,case,changes,field", EXPORT_REFUSED, ids=[f"{a}-{f}" for a, _, _, f in EXPORT_REFUSED])
def test_export_refuses_what_the_hf_architecture_cannot_hold(arch, case, changes, field) -> None:
    fields = {**fields_of(_cfg(case)), **changes}
    with pytest.raises(UnsupportedConfigError) as info:
        catalogue.from_megatron_fields(fields, arch)
    assert info.value.field == field


# -- tensor table -----------------------------------------------------------------------------------
def test_one_mapping_per_expert_and_layer_kinds() -> None:
    """Import reads and export writes one expert at a time: no mapping spans two experts."""
    fields = fields_of(_cfg(QWEN2_MOE))
    by_name = {m.megatron_name: m for m in catalogue.mapping_for("Qwen2MoeForCausalLM", fields)}
    fc1 = by_name["decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight"]
    assert fc1.hf_names == ("model.layers.1.mlp.experts.3.gate_proj.weight", "model.layers.1.mlp.experts.3.up_proj.weight")
    assert fc1.megatron_shape == (64, 64)
    assert by_name["decoder.layers.1.mlp.shared_experts.gate_weight"].hf_names == ("model.layers.1.mlp.shared_expert_gate.weight",)
    assert "decoder.layers.0.mlp.linear_fc1.weight" in by_name and "decoder.layers.0.mlp.router.weight" not in by_name
    assert "decoder.layers.1.mlp.linear_fc1.weight" not in by_name
    for m in by_name.values():
        assert len({n.split(".experts.")[1].split(".")[0] for n in m.hf_names if ".experts." in n}) <= 1


# -- expert layout ----------------------------------------------------------------------------------
@pytest.mark.parametrize("tp,ep,etp,world", [(1, 2, None, 2), (2, 2, 1, 2), (2, 1, None, 2), (1, 1, None, 1),
                                             (2, 4, 1, 4)])
def test_cli_world_size_follows_megatron_expert_layout(tp, ep, etp, world) -> None:
    from plugtron_hf_bridge.cli import _world

    assert _world(argparse.Namespace(tp=tp, pp=1, ep=ep, etp=etp)) == world


def test_expert_layout_on_a_dense_model_is_refused() -> None:
    from types import SimpleNamespace

    from plugtron_hf_bridge.errors import ConversionError
    from plugtron_hf_bridge.importer import set_layout

    with pytest.raises(ConversionError, match="Mixture-of-Experts"):
        set_layout(SimpleNamespace(num_moe_experts=None), 1, 1, None, "float32", ep=2)


def test_launcher_refuses_an_expert_layout_the_checkpoint_cannot_take(tmp_path) -> None:
    """Before any rank starts: experts not divisible by --ep."""
    from arch_cases import save_case
    from plugtron_hf_bridge.errors import ConversionError
    from plugtron_hf_bridge.preflight import preflight_import

    src = save_case(tmp_path / "hf", QWEN3_MOE)
    assert preflight_import(src, ep=2)
    with pytest.raises(ConversionError, match="4 routed experts cannot be split over --ep 3"):
        preflight_import(src, ep=3)
