"""NemotronH with MoE (``moe`` / ``E``) layers through the mamba family and the HF engine, one process.

* Float32 logit parity against transformers 5.23 at TP=1 on a tiny checkpoint with
  every layer kind (:data:`plugtron_mamba.hf.tiny.TINY_MOE_PATTERN`), sigmoid routing
  with a random ``e_score_correction_bias``, group-limited routing, renormalised
  top-k, routed scaling and a shared expert; export bit-exact, ``config.json``
  key for key. Each routing key translated is shown to matter: a variant moves
  transformers' logits, and the converted model follows it.
* Tables: HF -> megatron -> HF bit-exact in float32 and bfloat16, one mapping per expert.
* The published Nemotron-3 Nano 30B-A3B ``config.json`` translates.
* Refusals, by error type and field, at import (HF keys) and export (megatron fields).
(EP=2 and TP=2 x EP=2: ``test_mamba_moe_multirank.py``.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from plugtron_mamba.hf.adapters import NEMOTRON_H
from plugtron_mamba.hf.tiny import TINY_MOE, save_tiny_moe_hf, tiny_moe_hf_config

TOL = 1e-4
TOKENS = torch.randint(0, 100, (2, 13), generator=torch.Generator().manual_seed(3))
#: Variants of the tiny checkpoint: each changes one routing key (and transformers' logits).
VARIANTS = {
    "base": {},
    "routed_scaling_factor": {"routed_scaling_factor": 1.0},
    "no_group_limit": {"n_group": 1, "topk_group": 1},
    "top1_unnormalised": {"num_experts_per_tok": 1, "norm_topk_prob": False, "n_group": 1},
    "top4_all_groups": {"num_experts_per_tok": 4, "topk_group": 2},
}


@pytest.fixture(scope="module")
def pm() -> Any:
    from plugtron.manager import PlugtronPluginManager

    return PlugtronPluginManager()


@pytest.fixture(scope="module")
def converted(tmp_path_factory, plugtron_single_rank, pm) -> dict[str, Any]:
    """Per variant: the HF directory, the engine's import, transformers' logits and the verify report."""
    from plugtron_hf_bridge.importer import import_hf
    from plugtron_hf_bridge.verify import verify

    tmp = tmp_path_factory.mktemp("nemotron_h_moe")
    out = {}
    for name, changes in VARIANTS.items():
        src = save_tiny_moe_hf(tmp / name, **changes)
        imported = import_hf(src, pm=pm, parallel=plugtron_single_rank, progress=False)
        out[name] = {"src": src, "imported": imported, "report": verify(src, imported=imported),
                     "hf_logits": _hf_logits(src, TOKENS)}
    return out


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    found: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        found.update(load_file(shard))
    return found


def _hf_logits(src: Path, tokens: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.NemotronHForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens, use_cache=False).logits


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_float32_logits_match_transformers(converted, variant) -> None:
    report = converted[variant]["report"]
    assert report.max_abs_diff <= TOL and report.top1_agreement == 1.0 and report.logit_scale > 1.0, report


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "base"])
def test_each_routing_key_moves_transformers_logits(converted, variant) -> None:
    """The variant's key matters: transformers' logits move far beyond the parity bound (which still holds)."""
    moved = (converted["base"]["hf_logits"] - converted[variant]["hf_logits"]).abs().max()
    assert moved > 100 * TOL, (variant, float(moved))


def test_export_is_bit_exact_with_the_same_config(converted, tmp_path) -> None:
    from plugtron_hf_bridge.exporter import export_hf

    src, imported = converted["base"]["src"], converted["base"]["imported"]
    export_hf(imported.built, imported.plan.config, imported.plan.adapter, tmp_path / "out",
              source_hf_config=imported.plan.hf_config)
    left, right = _tensors(src), _tensors(tmp_path / "out")
    assert sorted(left) == sorted(right)
    assert [n for n in left if left[n].dtype != right[n].dtype or not torch.equal(left[n], right[n])] == []
    a, b = (json.loads((d / "config.json").read_text()) for d in (src, tmp_path / "out"))
    assert sorted(k for k in set(a) | set(b) if k != "transformers_version" and a.get(k) != b.get(k)) == []


def test_bfloat16_checkpoint_with_float32_router_bias_round_trips_bit_exact(tmp_path, plugtron_single_rank, pm) -> None:
    """Published bf16 NemotronH checkpoints keep ``e_score_correction_bias`` in float32 (transformers keeps it
    so); the bf16 model keeps its expert bias float32 too, so nothing is rounded on the way through."""
    from plugtron_hf_bridge.exporter import export_hf
    from plugtron_hf_bridge.importer import import_hf
    from plugtron_hf_bridge.verify import verify

    src = save_tiny_moe_hf(tmp_path / "hf", dtype="bfloat16")
    imported = import_hf(src, pm=pm, parallel=plugtron_single_rank, progress=False)
    assert imported.plan.dtype_name == "bfloat16"
    report = verify(src, imported=imported, dtype="bfloat16")
    assert report.ok and report.top1_agreement >= 0.9, report
    export_hf(imported.built, imported.plan.config, imported.plan.adapter, tmp_path / "out",
              source_hf_config=imported.plan.hf_config)
    left, right = _tensors(src), _tensors(tmp_path / "out")
    assert left["backbone.layers.0.mixer.gate.e_score_correction_bias"].dtype == torch.float32
    assert sorted(left) == sorted(right)
    assert [n for n in left if left[n].dtype != right[n].dtype or not torch.equal(left[n], right[n])] == []


def test_the_model_holds_megatrons_moe_layers_with_the_checkpoint_bias(converted) -> None:
    """``E`` layers are megatron's MoETransformerLayer/MoELayer; the router's expert bias is megatron's float32
    buffer (saved with the model, no parameter), loaded from ``e_score_correction_bias``; zeroing it
    changes the experts chosen, so the parity above depends on it."""
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.transformer_layer import MoETransformerLayer

    from plugtron_hf_bridge.verify import megatron_logits, sample_tokens

    imported = converted["base"]["imported"]
    model = imported.built.chunks[0]
    layers = [layer for layer in model.decoder.layers if isinstance(layer, MoETransformerLayer)]
    assert [layer.layer_number - 1 for layer in layers] == [0, 3, 6] and all(isinstance(l.mlp, MoELayer) for l in layers)
    hf = _tensors(converted["base"]["src"])
    for layer in layers:
        router = layer.mlp.router
        bias = router.expert_bias
        assert not isinstance(bias, torch.nn.Parameter) and bias.dtype == torch.float32
        assert "expert_bias" in router.state_dict() and "expert_bias" not in dict(router.named_parameters())
        assert torch.equal(bias, hf[f"backbone.layers.{layer.layer_number - 1}.mixer.gate.e_score_correction_bias"])
    tokens = sample_tokens(100, 2, 13)
    before = megatron_logits(imported.built, tokens)
    saved = [layer.mlp.router.expert_bias.detach().clone() for layer in layers]
    with torch.no_grad():
        for layer in layers:
            layer.mlp.router.expert_bias.zero_()
    try:
        assert (megatron_logits(imported.built, tokens) - before).abs().max() > 100 * TOL
    finally:
        with torch.no_grad():
            for layer, bias in zip(layers, saved):
                layer.mlp.router.expert_bias.copy_(bias)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tables_round_trip_bit_exact_one_mapping_per_expert(tmp_path, dtype) -> None:
    src = save_tiny_moe_hf(tmp_path / "hf", dtype=dtype)
    config = NEMOTRON_H.config_from_hf(json.loads((src / "config.json").read_text()))
    config.finalize()
    hf = _tensors(src)
    mappings = NEMOTRON_H.tensor_mappings(config)
    experts = [m for m in mappings if ".local_experts." in m.megatron_name]
    assert len(experts) == 3 * TINY_MOE["n_routed_experts"] * 2 and all(len(m.hf_names) == 1 for m in experts)
    back: dict[str, torch.Tensor] = {}
    for mapping in mappings:
        megatron = mapping.to_megatron([hf[n] for n in mapping.hf_names])
        assert tuple(megatron.shape) == mapping.megatron_shape
        back.update(zip(mapping.hf_names, mapping.to_hf(megatron.clone())))
    assert sorted(back) == sorted(hf)
    assert [n for n in hf if back[n].dtype != hf[n].dtype or not torch.equal(back[n], hf[n])] == []


#: NVIDIA-Nemotron-3-Nano-30B-A3B-BF16's config.json as published on the hub (checked key by key against two
#: verbatim copies: no ``time_step_limit``, which transformers' config class defaults).
NEMOTRON3_NANO = {
    "architectures": ["NemotronHForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_nemotron_h.NemotronHConfig",
                 "AutoModel": "modeling_nemotron_h.NemotronHForCausalLM",
                 "AutoModelForCausalLM": "modeling_nemotron_h.NemotronHForCausalLM"},
    "bos_token_id": 1, "chunk_size": 128, "conv_kernel": 4, "eos_token_id": 2, "expand": 2, "head_dim": 128,
    "hidden_dropout": 0.0, "hidden_size": 2688,
    "hybrid_override_pattern": "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
    "initializer_range": 0.02, "intermediate_size": 1856, "layer_norm_epsilon": 1e-05, "mamba_head_dim": 64,
    "mamba_hidden_act": "silu", "mamba_num_heads": 64, "mamba_proj_bias": False, "mamba_ssm_cache_dtype": "float32",
    "max_position_embeddings": 262144, "mlp_bias": False, "mlp_hidden_act": "relu2", "model_type": "nemotron_h",
    "moe_intermediate_size": 1856, "moe_shared_expert_intermediate_size": 3712, "n_group": 1, "n_groups": 8,
    "n_routed_experts": 128, "n_shared_experts": 1, "norm_eps": 1e-05, "norm_topk_prob": True,
    "num_attention_heads": 32, "num_experts_per_tok": 6, "num_hidden_layers": 52, "num_key_value_heads": 2,
    "num_logits_to_keep": 1, "pad_token_id": 0, "partial_rotary_factor": 1.0, "rescale_prenorm_residual": True,
    "residual_in_fp32": False, "rope_theta": 10000, "routed_scaling_factor": 2.5, "sliding_window": None,
    "ssm_state_size": 128, "tie_word_embeddings": False, "time_step_floor": 0.0001,
    "time_step_max": 0.1, "time_step_min": 0.001, "topk_group": 1, "torch_dtype": "bfloat16",
    "transformers_version": "4.55.4", "use_bias": False, "use_cache": True, "use_conv_bias": True,
    "use_mamba_kernels": True, "vocab_size": 131072,
}


def test_published_nemotron3_nano_config_translates_both_ways() -> None:
    config = NEMOTRON_H.config_from_hf(dict(NEMOTRON3_NANO), source="hub/config.json")
    pattern = config.layer_pattern()
    assert (pattern.count("M"), pattern.count("E"), pattern.count("*")) == (23, 23, 6)
    expected = {"num_moe_experts": 128, "moe_router_topk": 6, "moe_ffn_hidden_size": 1856,
                "moe_shared_expert_intermediate_size": 3712, "moe_router_score_function": "sigmoid",
                "moe_router_enable_expert_bias": True, "moe_router_pre_softmax": False,
                "moe_router_topk_scaling_factor": 2.5, "moe_router_num_groups": None, "moe_router_dtype": "fp32",
                "num_query_groups": 2, "kv_channels": 128, "mamba_num_heads": 64, "hidden_size": 2688}
    assert {k: getattr(config, k) for k in expected} == expected
    config.finalize()
    again = NEMOTRON_H.config_from_hf(NEMOTRON_H.config_to_hf(config, passthrough=dict(NEMOTRON3_NANO)))
    assert {k: getattr(again, k) for k in expected} == expected and again.layer_pattern() == pattern


def _hf_dict(**changes: Any) -> dict[str, Any]:
    return tiny_moe_hf_config(**changes).to_dict()


@pytest.mark.parametrize("changes,field,words", [
    ({"norm_topk_prob": False}, "norm_topk_prob", "always renormalises"),
    ({"num_experts_per_tok": 1}, "norm_topk_prob", "divides its score by itself"),
    ({"moe_latent_size": 16}, "moe_latent_size", "TELinear"),
    ({"num_experts_per_tok": 3}, "topk_group", "top-2"),
    ({"n_group": 3}, "n_group", "divide"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok", "between 1 and"),
    ({"moe_shared_expert_intermediate_size": 0}, "moe_shared_expert_intermediate_size", "shared expert"),
    ({"mlp_hidden_act": "silu"}, "mlp_hidden_act", "relu2"),
])
def test_import_refuses_what_megatron_cannot_compute(changes, field, words) -> None:
    from plugtron.conversion.errors import UnsupportedConfigError

    with pytest.raises(UnsupportedConfigError) as info:
        NEMOTRON_H.config_from_hf(_hf_dict(**changes), source="x/config.json")
    assert info.value.field == field and words in str(info.value) and "x/config.json" in str(info.value)


@pytest.mark.parametrize("changes,field", [
    ({"moe_router_enable_expert_bias": False}, "moe_router_enable_expert_bias"),
    ({"moe_shared_expert_intermediate_size": None}, "moe_shared_expert_intermediate_size"),
    ({"moe_shared_expert_gate": True}, "moe_shared_expert_gate"),
    ({"moe_router_topk": 3}, "moe_router_group_topk"),
    ({"moe_expert_capacity_factor": 1.0}, "moe_expert_capacity_factor"),
])
def test_export_refuses_what_nemotron_h_cannot_express(changes, field) -> None:
    from plugtron.conversion.errors import UnsupportedConfigError

    config = NEMOTRON_H.config_from_hf(_hf_dict())
    for key, value in changes.items():
        setattr(config, key, value)
    with pytest.raises(UnsupportedConfigError) as info:
        NEMOTRON_H.config_to_hf(config)
    assert info.value.field == field
