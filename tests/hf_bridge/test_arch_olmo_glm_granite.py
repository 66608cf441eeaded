"""OLMo 2, GLM, GLM-4-0414 and Granite: published config.json files, the fields they translate to,
every translated field shown to change transformers' logits, and the refusals.

Parity (TP=1, TP=2, PP=2) and the bit-exact round trip run from ``arch_cases/olmo_glm_granite.py``
in the shared harness (``test_arch_parity.py``, ``test_arch_multirank.py``).
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from arch_cases import field_matters
from arch_cases.olmo_glm_granite import GLM, GLM4, GRANITE
from plugtron.conversion import UnsupportedConfigError
from plugtron_gpt.hf import catalogue

# The config.json files as published on the Hugging Face hub (older spellings: top-level rope_theta,
# partial_rotary_factor, rope_scaling: null, torch_dtype).
OLMO2_7B = {  # allenai/OLMo-2-1124-7B
    "architectures": ["Olmo2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "eos_token_id": 100257,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008,
    "max_position_embeddings": 4096, "model_type": "olmo2", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 32, "pad_token_id": 100277, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 500000, "tie_word_embeddings": False, "torch_dtype": "float32",
    "transformers_version": "4.47.0.dev0", "use_cache": True, "vocab_size": 100352}
GLM4_9B_CHAT_HF = {  # THUDM/glm-4-9b-chat-hf
    "architectures": ["GlmForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "eos_token_id": [151329, 151336, 151338], "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 13696, "max_position_embeddings": 131072, "model_type": "glm",
    "num_attention_heads": 32, "num_hidden_layers": 40, "num_key_value_heads": 2, "pad_token_id": 151329,
    "partial_rotary_factor": 0.5, "rms_norm_eps": 1.5625e-07, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.46.0.dev0", "use_cache": True, "vocab_size": 151552}
GLM4_9B_0414 = {  # THUDM/GLM-4-9B-0414
    "architectures": ["Glm4ForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "eos_token_id": [151329, 151336, 151338], "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 13696, "max_position_embeddings": 32768, "model_type": "glm4",
    "num_attention_heads": 32, "num_hidden_layers": 40, "num_key_value_heads": 2, "pad_token_id": 151329,
    "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.51.3", "use_cache": True, "vocab_size": 151552}
GRANITE_31_2B = {  # ibm-granite/granite-3.1-2b-instruct
    "architectures": ["GraniteForCausalLM"], "attention_bias": False, "attention_dropout": 0.1,
    "attention_multiplier": 0.015625, "bos_token_id": 0, "embedding_multiplier": 12.0, "eos_token_id": 0,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
    "logits_scaling": 8.0, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "granite",
    "num_attention_heads": 32, "num_hidden_layers": 40, "num_key_value_heads": 8, "pad_token_id": 0,
    "residual_multiplier": 0.22, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 5000000.0,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.46.0.dev0",
    "use_cache": True, "vocab_size": 49155}

PUBLISHED = {
    "olmo2": (OLMO2_7B, {"norm_placement": "post", "qk_layernorm": True, "qk_norm_scope": "full",
                         "rotary_base": 500000, "num_query_groups": 32, "layernorm_epsilon": 1e-6}),
    "glm": (GLM4_9B_CHAT_HF, {"rotary_interleaved": True, "rotary_percent": 0.5, "add_qkv_bias": True,
                              "add_bias_linear": False, "kv_channels": 128, "num_query_groups": 2,
                              "layernorm_epsilon": 1.5625e-07}),
    "glm4": (GLM4_9B_0414, {"rotary_interleaved": True, "rotary_percent": 0.5, "add_qkv_bias": True,
                            "norm_placement": "sandwich", "seq_length": 32768}),
    "granite": (GRANITE_31_2B, {"embedding_multiplier": 12.0, "residual_multiplier": 0.22, "logits_divisor": 8.0,
                                "softmax_scale": 0.015625, "rotary_base": 5000000.0,
                                "share_embeddings_and_output_weights": True, "num_query_groups": 8}),
}


def fields_of(cfg: dict) -> dict:
    return catalogue.to_megatron_fields(cfg, source="config.json")


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_configs_translate_and_export(name) -> None:
    cfg, expected = PUBLISHED[name]
    fields = fields_of(cfg)
    assert {k: fields[k] for k in expected} == expected
    arch = cfg["architectures"][0]
    exported = catalogue.from_megatron_fields(fields, arch, passthrough=cfg)
    assert fields_of(exported) == fields
    names = {n for m in catalogue.mapping_for(arch, fields) for n in m.hf_names}
    assert len(names) == len(set(names))


def test_published_tensor_tables() -> None:
    """The tensors each published model's checkpoint holds, with their shapes."""
    def shapes(cfg: dict) -> dict:
        fields = fields_of(cfg)
        table = catalogue.mapping_for(cfg["architectures"][0], fields)
        return {n: s for m in table for n, s in zip(m.hf_names, m.hf_shapes) if ".layers.0." in n}

    olmo = shapes(OLMO2_7B)
    assert olmo["model.layers.0.self_attn.q_norm.weight"] == (4096,)
    assert olmo["model.layers.0.post_feedforward_layernorm.weight"] == (4096,)
    assert "model.layers.0.input_layernorm.weight" not in olmo
    glm = shapes(GLM4_9B_CHAT_HF)
    assert glm["model.layers.0.mlp.gate_up_proj.weight"] == (2 * 13696, 4096)
    assert glm["model.layers.0.self_attn.k_proj.bias"] == (256,)
    assert "model.layers.0.self_attn.o_proj.bias" not in glm
    glm4 = shapes(GLM4_9B_0414)
    assert set(glm4) - set(glm) == {"model.layers.0.post_self_attn_layernorm.weight",
                                    "model.layers.0.post_mlp_layernorm.weight"}
    granite = shapes(GRANITE_31_2B)
    assert granite["model.layers.0.self_attn.k_proj.weight"] == (512, 2048)


# -- GLM's partial rotary default --------------------------------------------------------------
def test_glm_partial_rotary_defaults_to_half_and_is_always_written() -> None:
    """GlmConfig takes 0.5 when the file gives no partial_rotary_factor, so export writes 1.0 explicitly."""
    bare = {k: v for k, v in GLM4_9B_CHAT_HF.items() if k != "partial_rotary_factor"}
    assert fields_of(bare)["rotary_percent"] == 0.5
    rope = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 1.0}
    full = fields_of({**bare, "rope_parameters": rope})
    assert full["rotary_percent"] == 1.0
    exported = catalogue.from_megatron_fields(full, "GlmForCausalLM")
    assert exported["rope_parameters"]["partial_rotary_factor"] == 1.0
    assert fields_of(exported)["rotary_percent"] == 1.0


# -- every field beyond Llama's moves transformers' logits -----------------------------------------
MATTERS = [
    (GLM, "rope_parameters", {"rope_type": "default", "rope_theta": 1000.0, "partial_rotary_factor": 1.0}),
    (GLM4, "rope_parameters", {"rope_type": "default", "rope_theta": 1000.0, "partial_rotary_factor": 0.25}),
    (GRANITE, "embedding_multiplier", 1.0),
    (GRANITE, "residual_multiplier", 1.0),
    (GRANITE, "attention_multiplier", 0.05),
    (GRANITE, "logits_scaling", 1.0),
]


@pytest.mark.parametrize("case,key,value", MATTERS, ids=[f"{c.name}-{k}" for c, k, _ in MATTERS])
def test_translated_field_changes_transformers_logits(tmp_path, case, key, value) -> None:
    assert field_matters(tmp_path, case, key, value) > 1e-2


def test_glm_rotary_layout_matters(tmp_path) -> None:
    """The rotary layout is no config key, so it is shown apart: the same GLM weights (full rotary)
    loaded into Llama, whose RoPE is rotate-half, give different logits. The parity tests then
    show megatron's ``rotary_interleaved`` reproduces GLM's layout."""
    import torch
    import transformers

    from arch_cases import hf_logits, save_case

    glm_dir = save_case(tmp_path / "glm", dataclasses.replace(GLM, config={**GLM.config, "rope_parameters": {
        "rope_type": "default", "rope_theta": 1000.0, "partial_rotary_factor": 1.0}}))
    model = transformers.AutoModelForCausalLM.from_pretrained(glm_dir, dtype=torch.float32)
    state = model.state_dict()
    for i in range(GLM.config["num_hidden_layers"]):
        gate, up = state.pop(f"model.layers.{i}.mlp.gate_up_proj.weight").chunk(2)
        state[f"model.layers.{i}.mlp.gate_proj.weight"], state[f"model.layers.{i}.mlp.up_proj.weight"] = gate, up
        state[f"model.layers.{i}.self_attn.o_proj.bias"] = torch.zeros(GLM.config["hidden_size"])
        for proj in ("gate", "up", "down"):
            state[f"model.layers.{i}.mlp.{proj}_proj.bias"] = torch.zeros(
                GLM.config["hidden_size"] if proj == "down" else GLM.config["intermediate_size"])
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **{k: GLM.config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                      "num_key_value_heads", "vocab_size", "head_dim", "rms_norm_eps",
                                      "max_position_embeddings")},
        attention_bias=True, mlp_bias=True, rope_parameters={"rope_type": "default", "rope_theta": 1000.0}))
    llama.load_state_dict(state)
    tokens = torch.randint(0, GLM.config["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        rotate_half = llama.eval()(tokens).logits
    assert float((hf_logits(glm_dir, tokens) - rotate_half).abs().max()) > 1e-2


# -- refusals: reading ------------------------------------------------------------------------
READ_REFUSALS = [
    (OLMO2_7B, {"attention_bias": True}, "attention_bias", "not the MLP"),
    (OLMO2_7B, {"clip_qkv": 8.0}, "clip_qkv", "unknown to the Olmo2ForCausalLM converter"),
    (OLMO2_7B, {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type", "not supported"),
    (GLM4_9B_CHAT_HF, {"head_dim": None}, "head_dim", "cannot be built"),
    (GLM4_9B_CHAT_HF, {"num_key_value_heads": None}, "num_key_value_heads", "cannot be built"),
    (GLM4_9B_CHAT_HF, {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type", "interleaved"),
    (GLM4_9B_0414, {"head_dim": None}, "head_dim", "must be an integer"),
    (GLM4_9B_0414, {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
     "rope_parameters.rope_type", "interleaved"),
    (GRANITE_31_2B, {"logits_scaling": 0.0}, "logits_scaling", "must be positive"),
    (GRANITE_31_2B, {"logits_scaling": -2.0}, "logits_scaling", "must be positive"),
    (GRANITE_31_2B, {"embedding_multiplier": True}, "embedding_multiplier", "finite number"),
    (GRANITE_31_2B, {"attention_multiplier": "0.1"}, "attention_multiplier", "finite number"),
    (GRANITE_31_2B, {"residual_multiplier": math.inf}, "residual_multiplier", "finite number"),
    (GRANITE_31_2B, {"attention_bias": True}, "mlp_bias", "add_bias_linear sets both"),
    (GRANITE_31_2B, {"sliding_window": 512}, "sliding_window", "not supported"),
]


@pytest.mark.parametrize("cfg,change,key,message", READ_REFUSALS,
                         ids=[f"{c['model_type']}-{k}" for c, _, k, _ in READ_REFUSALS])
def test_read_refusals_name_the_field(cfg, change, key, message) -> None:
    with pytest.raises(UnsupportedConfigError, match=message) as info:
        fields_of({**cfg, **change})
    assert info.value.field == key and info.value.source == "config.json"


# -- refusals: writing ------------------------------------------------------------------------
WRITE_REFUSALS = [
    ("Olmo2ForCausalLM", OLMO2_7B, {"norm_placement": "pre"}, "norm_placement"),
    ("Olmo2ForCausalLM", OLMO2_7B, {"qk_norm_scope": "head"}, "qk_norm_scope"),
    ("GlmForCausalLM", GLM4_9B_CHAT_HF, {"rotary_interleaved": False}, "rotary_interleaved"),
    ("GlmForCausalLM", GLM4_9B_CHAT_HF, {"norm_placement": "sandwich"}, "norm_placement"),
    ("Glm4ForCausalLM", GLM4_9B_0414, {"norm_placement": "pre"}, "norm_placement"),
    ("GraniteForCausalLM", GRANITE_31_2B, {"norm_placement": "post"}, "norm_placement"),
    ("GraniteForCausalLM", GRANITE_31_2B, {"rotary_interleaved": True}, "rotary_interleaved"),
    # Llama cannot carry Granite's multipliers, nor Olmo2's norms.
    ("LlamaForCausalLM", GRANITE_31_2B, {}, "softmax_scale"),
    ("LlamaForCausalLM", GRANITE_31_2B, {"softmax_scale": None}, "embedding_multiplier"),
    ("LlamaForCausalLM", GRANITE_31_2B, {"softmax_scale": None, "embedding_multiplier": None}, "residual_multiplier"),
    ("LlamaForCausalLM", GRANITE_31_2B, {"softmax_scale": None, "embedding_multiplier": None,
                                         "residual_multiplier": None}, "logits_divisor"),
    ("LlamaForCausalLM", OLMO2_7B, {}, "norm_placement"),
]


@pytest.mark.parametrize("arch,cfg,change,key", WRITE_REFUSALS,
                         ids=[f"{a}-{k}" for a, _, _, k in WRITE_REFUSALS])
def test_export_refuses_what_the_architecture_cannot_express(arch, cfg, change, key) -> None:
    fields = {**fields_of(cfg), **change}
    with pytest.raises(UnsupportedConfigError) as info:
        catalogue.from_megatron_fields(fields, arch)
    assert info.value.field == key


def test_granite_neutral_multipliers_are_off_and_attention_scale_is_explicit() -> None:
    """1.0 reads as "off" (None); softmax_scale is always set, and exported as head_dim ** -0.5 when None."""
    neutral = {**GRANITE_31_2B, "embedding_multiplier": 1.0, "residual_multiplier": 1, "logits_scaling": 1.0}
    fields = fields_of(neutral)
    assert (fields["embedding_multiplier"], fields["residual_multiplier"], fields["logits_divisor"]) == (None,) * 3
    exported = catalogue.from_megatron_fields({**fields, "softmax_scale": None}, "GraniteForCausalLM")
    assert exported["attention_multiplier"] == pytest.approx(64 ** -0.5)
    assert "head_dim" not in exported
