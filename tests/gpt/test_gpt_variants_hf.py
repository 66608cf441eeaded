"""Logit parity with transformers 5.23 for every architecture the variant fields are for.

Each case builds a tiny megatron GPT through plugtron's pipeline with the
``torch`` spec and the variant fields, randomises every parameter (norm
weights included, so zero-centred gammas and post-norms are not trivially
identity), copies the weights into the transformers model of the same
architecture (test-side mapping, written from the conventions in the
project notes: q/k/v rows per query group, fc1 = [gate; up]) and compares
float32 logits on a sequence longer than the sliding windows.

This is the evidence that a converter can reach parity with the fields; the
config each case uses is the mapping a converter needs (see
``/tmp/gpt_features.md`` and plugins/gpt/README.md).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

V, H, HEADS, D = 128, 48, 4, 16  # hidden 48 with head_dim 16: kv_channels != hidden / heads
SEQ = 14
COMMON_HF = dict(vocab_size=V, hidden_size=H, intermediate_size=80, num_attention_heads=HEADS, num_key_value_heads=2,
                 max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, attention_dropout=0.0)
COMMON_MG = dict(vocab_size=V, make_vocab_size_divisible_by=V, hidden_size=H, ffn_hidden_size=80, num_attention_heads=HEADS,
                 num_query_groups=2, kv_channels=D, seq_length=32, hidden_dropout=0.0, attention_dropout=0.0,
                 use_cpu_initialization=True, layer_spec="torch", add_bias_linear=False)
SILU = dict(normalization="RMSNorm", gated_linear_unit=True, activation_func="torch.nn.functional:silu")
GELU_TANH = "plugtron.activations:gelu_tanh"
LLAMA_NAMES = {"input_layernorm": "input_layernorm", "pre_mlp_layernorm": "post_attention_layernorm"}
SANDWICH_NAMES = {"input_layernorm": "input_layernorm", "pre_mlp_layernorm": "pre_feedforward_layernorm",
                  "post_attention_layernorm": "post_attention_layernorm", "post_mlp_layernorm": "post_feedforward_layernorm"}
ROPE_HALF = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}

# name: (HF class, HF config kwargs, megatron config kwargs, layout)
CASES: dict[str, tuple[str, dict, dict, dict]] = {
    "gemma": ("Gemma", dict(head_dim=D, num_key_value_heads=1, rms_norm_eps=1e-6),
              dict(SILU, num_query_groups=1, activation_func=GELU_TANH, layernorm_epsilon=1e-6, layernorm_zero_centered_gamma=True,
                   embedding_multiplier=H ** 0.5, embedding_multiplier_cast=True, share_embeddings_and_output_weights=True),
              dict(names=LLAMA_NAMES)),
    "gemma2": ("Gemma2", dict(head_dim=D, num_hidden_layers=3, rms_norm_eps=1e-6, query_pre_attn_scalar=24, attn_logit_softcapping=0.5,
                              final_logit_softcapping=2.0, sliding_window=4),
               dict(SILU, num_layers=3, activation_func=GELU_TANH, layernorm_epsilon=1e-6, layernorm_zero_centered_gamma=True,
                    embedding_multiplier=H ** 0.5, embedding_multiplier_cast=True, share_embeddings_and_output_weights=True,
                    norm_placement="sandwich", softmax_scale=24 ** -0.5, attention_softcap=0.5, final_logit_softcap=2.0,
                    window_size=[3, 0], window_attn_skip_freq=2),
               dict(names=SANDWICH_NAMES)),
    "gemma3": ("Gemma3Text", dict(head_dim=D, num_hidden_layers=3, rms_norm_eps=1e-6, query_pre_attn_scalar=D, sliding_window=4,
                                  layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                  rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                   "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}}),
               dict(SILU, num_layers=3, activation_func=GELU_TANH, layernorm_epsilon=1e-6, layernorm_zero_centered_gamma=True,
                    embedding_multiplier=H ** 0.5, embedding_multiplier_cast=True, share_embeddings_and_output_weights=True,
                    norm_placement="sandwich", qk_layernorm=True, window_size=[3, 0], window_attn_skip_freq=[1, 0, 1],
                    rotary_base=1000000, seq_len_interpolation_factor=8.0, rotary_base_local=10000.0),
               dict(names=SANDWICH_NAMES)),
    "olmo2": ("Olmo2", dict(rms_norm_eps=1e-6, head_dim=D),
              dict(SILU, layernorm_epsilon=1e-6, norm_placement="post", qk_layernorm=True, qk_norm_scope="full"),
              dict(names={"post_attention_layernorm": "post_attention_layernorm",
                          "post_mlp_layernorm": "post_feedforward_layernorm"})),
    "glm4": ("Glm4", dict(head_dim=D, rms_norm_eps=1e-6, attention_bias=True, rope_parameters=ROPE_HALF),
             dict(SILU, layernorm_epsilon=1e-6, norm_placement="sandwich", add_qkv_bias=True, rotary_percent=0.5, rotary_interleaved=True),
             dict(names={"input_layernorm": "input_layernorm", "pre_mlp_layernorm": "post_attention_layernorm",
                         "post_attention_layernorm": "post_self_attn_layernorm", "post_mlp_layernorm": "post_mlp_layernorm"}, gate_up=True)),
    "granite": ("Granite", dict(rms_norm_eps=1e-6, embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0078125,
                                logits_scaling=8.0),
                dict(SILU, layernorm_epsilon=1e-6, kv_channels=H // HEADS, embedding_multiplier=12.0, residual_multiplier=0.22,
                     softmax_scale=0.0078125, logits_divisor=8.0),
                dict(names=LLAMA_NAMES)),
    "smollm3": ("SmolLM3", dict(num_hidden_layers=4, rms_norm_eps=1e-6, use_sliding_window=True, sliding_window=4),
                dict(SILU, num_layers=4, layernorm_epsilon=1e-6, kv_channels=H // HEADS, rotary_base=2000000,
                     no_rope_freq=[0, 0, 0, 1], window_size=[3, 0], window_attn_skip_freq=[0, 0, 0, 1],
                     share_embeddings_and_output_weights=True),
                dict(names=LLAMA_NAMES)),
    "nemotron": ("Nemotron", dict(head_dim=D, norm_eps=1e-5, rope_parameters=ROPE_HALF),
                 dict(normalization="LayerNorm", gated_linear_unit=False, activation_func="megatron.core.activations:squared_relu",
                      layernorm_epsilon=1e-5, layernorm_zero_centered_gamma=True, rotary_percent=0.5),
                 dict(names=LLAMA_NAMES, up_only=True)),
    "stablelm": ("StableLm", dict(layer_norm_eps=1e-5, use_qkv_bias=True, rope_parameters=ROPE_HALF),
                 dict(SILU, normalization="LayerNorm", layernorm_epsilon=1e-5, add_qkv_bias=True, rotary_percent=0.5, kv_channels=H // HEADS),
                 dict(names=LLAMA_NAMES)),
    "glm": ("Glm", dict(head_dim=D, rms_norm_eps=1e-6, attention_bias=True, rope_parameters=ROPE_HALF),
            dict(SILU, layernorm_epsilon=1e-6, add_qkv_bias=True, rotary_percent=0.5, rotary_interleaved=True),
            dict(names=LLAMA_NAMES, gate_up=True)),
    "ernie4_5": ("Ernie4_5", dict(head_dim=D, rms_norm_eps=1e-6, use_bias=False),
                 dict(SILU, layernorm_epsilon=1e-6, rotary_interleaved=True, rotary_base=500000,
                      share_embeddings_and_output_weights=True),
                 dict(names=LLAMA_NAMES)),
    "starcoder2": ("Starcoder2", dict(norm_epsilon=1e-5, use_bias=True, sliding_window=4, hidden_act="gelu_pytorch_tanh"),
                   dict(normalization="LayerNorm", gated_linear_unit=False, activation_func=GELU_TANH, layernorm_epsilon=1e-5, add_bias_linear=True,
                        window_size=[3, 0], share_embeddings_and_output_weights=True, kv_channels=H // HEADS),
                   dict(names=LLAMA_NAMES, up_only=True, mlp=("c_fc", "c_proj"))),
    "phi3": ("Phi3", dict(rms_norm_eps=1e-6, sliding_window=4, rope_parameters=ROPE_HALF),
             dict(SILU, layernorm_epsilon=1e-6, window_size=[3, 0], rotary_percent=0.5, kv_channels=H // HEADS),
             dict(names=LLAMA_NAMES, gate_up=True, qkv_fused=True)),
    "mistral": ("Mistral", dict(head_dim=D, rms_norm_eps=1e-6, sliding_window=4), dict(SILU, layernorm_epsilon=1e-6, window_size=[3, 0]),
                dict(names=LLAMA_NAMES)),
    "qwen2": ("Qwen2", dict(num_hidden_layers=3, rms_norm_eps=1e-6, use_sliding_window=True, sliding_window=4, max_window_layers=1),
              dict(SILU, num_layers=3, layernorm_epsilon=1e-6, add_qkv_bias=True, window_size=[3, 0], window_attn_skip_freq=[0, 1, 1],
                   kv_channels=H // HEADS),
              dict(names=LLAMA_NAMES)),
}


def _megatron_config(overrides: dict[str, Any]) -> Any:
    from plugtron.config import from_dict

    data = dict(COMMON_MG, num_layers=2, family="gpt")
    data.update(overrides)
    return from_dict(data)


def _randomise(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 0.2 if param.dim() == 1 else 0.05
            param.add_(torch.randn(param.shape, generator=gen) * scale)


def _split_qkv(weight: torch.Tensor, groups: int, per_group: int) -> tuple[torch.Tensor, ...]:
    head_dim = weight.shape[0] // (groups * (per_group + 2))
    blocks = weight.reshape(groups, (per_group + 2) * head_dim, *weight.shape[1:])
    q = blocks[:, : per_group * head_dim].reshape(-1, *weight.shape[1:])
    k = blocks[:, per_group * head_dim : (per_group + 1) * head_dim].reshape(-1, *weight.shape[1:])
    v = blocks[:, (per_group + 1) * head_dim :].reshape(-1, *weight.shape[1:])
    return q, k, v


def to_hf(state: dict[str, torch.Tensor], layers: int, groups: int, layout: dict) -> dict[str, torch.Tensor]:
    """The megatron state dict under the transformers names of ``layout``."""
    out = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"]}
    out["lm_head.weight"] = state.get("output_layer.weight", state["embedding.word_embeddings.weight"])
    for suffix in ("weight", "bias"):
        if f"decoder.final_layernorm.{suffix}" in state:
            out[f"model.norm.{suffix}"] = state[f"decoder.final_layernorm.{suffix}"]
    for i in range(layers):
        mg, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
        for ours, theirs in layout["names"].items():
            for suffix in ("weight", "bias"):
                if f"{mg}{ours}.{suffix}" in state:
                    out[f"{hf}{theirs}.{suffix}"] = state[f"{mg}{ours}.{suffix}"]
        for suffix in ("weight", "bias"):
            fused = state.get(f"{mg}self_attention.linear_qkv.{suffix}")
            if fused is None:
                continue
            q, k, v = _split_qkv(fused, groups, HEADS // groups)
            if layout.get("qkv_fused"):
                out[f"{hf}self_attn.qkv_proj.{suffix}"] = torch.cat([q, k, v])
            else:
                out.update({f"{hf}self_attn.{n}_proj.{suffix}": t for n, t in zip("qkv", (q, k, v))})
        for ours, theirs in (("q_layernorm", "q_norm"), ("k_layernorm", "k_norm")):
            if f"{mg}self_attention.{ours}.weight" in state:
                out[f"{hf}self_attn.{theirs}.weight"] = state[f"{mg}self_attention.{ours}.weight"]
        up, down = layout.get("mlp", ("up_proj", "down_proj"))
        for suffix in ("weight", "bias"):
            if f"{mg}self_attention.linear_proj.{suffix}" in state:
                out[f"{hf}self_attn.o_proj.{suffix}"] = state[f"{mg}self_attention.linear_proj.{suffix}"]
            if f"{mg}mlp.linear_fc2.{suffix}" in state:
                out[f"{hf}mlp.{down}.{suffix}"] = state[f"{mg}mlp.linear_fc2.{suffix}"]
            fc1 = state.get(f"{mg}mlp.linear_fc1.{suffix}")
            if fc1 is None:
                continue
            if layout.get("up_only"):
                out[f"{hf}mlp.{up}.{suffix}"] = fc1
            elif layout.get("gate_up"):
                out[f"{hf}mlp.gate_up_proj.{suffix}"] = fc1
            else:
                gate, up_rows = fc1.chunk(2)
                out[f"{hf}mlp.gate_proj.{suffix}"], out[f"{hf}mlp.up_proj.{suffix}"] = gate, up_rows
    return out


def _hf_model(kind: str, kwargs: dict[str, Any], layers: int) -> torch.nn.Module:
    import transformers

    config = getattr(transformers, f"{kind}Config")(**{**COMMON_HF, "num_hidden_layers": layers, **kwargs})
    config._attn_implementation = "eager"
    model_class = getattr(transformers, f"{kind.replace('Text', '')}ForCausalLM")
    return model_class(config).eval()


def _compare(build: Any, case: str, **wrong: Any) -> tuple[torch.Tensor, torch.Tensor]:
    kind, hf_kwargs, mg_overrides, layout = CASES[case]
    config = _megatron_config({**mg_overrides, **wrong})
    built = build(config)
    model, builder = built.chunks[0], built.context.builder
    _randomise(model, seed=len(case))
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    hf = _hf_model(kind, hf_kwargs, config.num_layers)
    missing, unexpected = hf.load_state_dict(to_hf(state, config.num_layers, config.num_query_groups, layout), strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k and "embed_scale" not in k], (missing, unexpected)
    tokens = torch.randint(3, V, (2, SEQ), generator=torch.Generator().manual_seed(7))
    batch = {"tokens": tokens, "position_ids": torch.arange(SEQ).expand(2, -1).contiguous()}
    with torch.no_grad():
        ours = builder.forward_step(model.eval(), batch)
        theirs = hf(input_ids=tokens).logits
    assert ours.shape == theirs.shape and math.isfinite(float(theirs.abs().max()))
    return ours, theirs


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(build, case: str) -> None:
    ours, theirs = _compare(build, case)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=2e-5)
    assert theirs.std() > 0.01


#: One wrong setting per row: the comparison must see it (the parity above is not vacuous).
ABLATIONS = [
    ("mistral", {"window_size": [4, 0]}),  # HF sliding_window W is (W - 1, 0)
    ("qwen2", {"window_attn_skip_freq": [1, 0, 0]}),  # 1 marks the windowed layers
    ("smollm3", {"no_rope_freq": [1, 1, 1, 0]}),  # megatron's list is HF's no_rope_layers inverted
    ("glm", {"rotary_interleaved": False}),
    ("gemma2", {"attention_softcap": None}),
    ("gemma3", {"rotary_base_local": None}),
    ("granite", {"residual_multiplier": None}),
]


@pytest.mark.parametrize("case,wrong", ABLATIONS, ids=[f"{c}-{next(iter(w))}" for c, w in ABLATIONS])
def test_a_wrong_setting_breaks_parity(build, case: str, wrong: dict) -> None:
    ours, theirs = _compare(build, case, **wrong)
    assert (ours - theirs).abs().max() > 1e-3
