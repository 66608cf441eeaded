"""gpt-oss (``GptOssForCausalLM``): read completely, refused field by field.

What megatron-core 0.16.1 can express of it, and how (the translation is kept, so
that the refusal below lists only what is really missing):

- alternating sliding window (``layer_types``, ``sliding_window``): ``window_size`` +
  ``window_attn_skip_freq``, as Gemma 2;
- clamped SwiGLU (``swiglu_alpha`` 1.702, ``swiglu_limit``): megatron's GLU with
  ``activation_func = quick_gelu`` (x * sigmoid(1.702 x)), ``glu_linear_offset = 1`` and
  ``activation_func_clamp_value = swiglu_limit`` computes exactly HF's
  ``(clamp(up, -l, l) + 1) * glu(clamp(gate, max=l))``; another ``swiglu_alpha`` has no
  megatron knob (quick_gelu's 1.702 is a constant);
- router and expert biases: ``add_bias_linear`` (router, experts, o_proj alike; so
  ``attention_bias: false`` with biased experts is not expressible), ETP = 1 only;
- top-k then softmax routing: ``moe_router_pre_softmax = False``; yarn RoPE with
  ``truncate: false``: ``yarn_correction_range_round_to_int = False``.

What refuses every gpt-oss checkpoint today (no config key switches them off):

- ``self_attn.sinks``: a learnable logit per head that joins every softmax. megatron has it
  (``softmax_type='learnable'``, ``softmax_offset``) only in its unfused
  ``DotProductAttention`` and TE; the GPT family's torch spec attends with SDPA
  (``plugtron_gpt.attention.SDPACoreAttention``), which has no offset;
- ``mlp.experts.gate_up_proj``: every expert of a layer in one ``[E, H, 2I]`` tensor, gate
  and up interleaved column by column (and ``..._bias`` ``[E, 2I]``): the core's tensor-table
  vocabulary (``plugtron.conversion``) has no rule for one expert's transposed,
  de-interleaved slice of a fused tensor, so per-expert streaming cannot be described.

MXFP4 (``quantization_config.quant_method: mxfp4``, as published) is understood here, and
dequantised by the engine's :mod:`plugtron_hf_bridge.quantization` arithmetic once the
table can name these tensors.
"""

from __future__ import annotations

from typing import Any

from plugtron.conversion import BOOL, FLOAT, INT, ConfigReader, ConfigSchema, UnsupportedConfigError

from .adapter import GPTAdapter
from .architecture import Fields
from .gemma2 import compact_skip_freq
from .llama import FULL, LLAMA, SLIDING, derive_heads, layer_types_of, window_fields
from .qwen3_moe import read_moe
from .rope import rope_fields_from_hf

QUICK_GELU_ALPHA = 1.702  # megatron.core.fusions.fused_bias_geglu.quick_gelu's constant
DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096}
#: Refused on every checkpoint: (what, why) -- see the module docstring.
ALWAYS_REFUSED = (
    ("self_attn.sinks", "learnable attention sinks on every layer: megatron's softmax_type='learnable' exists only in its "
                        "unfused DotProductAttention / TE, not in the GPT family's SDPA attention"),
    ("mlp.experts.gate_up_proj", "all experts of a layer fused in one [E, H, 2I] tensor with gate/up interleaved by "
                                 "column: the tensor-table vocabulary cannot name one expert's slice of it"),
)


def _read(k: ConfigReader) -> Fields:
    """The translatable fields, then one refusal naming every field megatron cannot take (and its value)."""
    refused = [f"{what}: {why}" for what, why in ALWAYS_REFUSED]
    _accept_quantization(k)
    layers, heads = k.get("num_hidden_layers"), k.get("num_attention_heads")
    if not k.get("attention_bias"):
        refused.append("attention_bias=False: the experts and router keep their biases, and megatron has one "
                       "add_bias_linear for o_proj, router and experts")
    alpha = k.get("swiglu_alpha")
    if alpha != QUICK_GELU_ALPHA:
        refused.append(f"swiglu_alpha={alpha!r}: megatron's quick_gelu fixes the sigmoid gain at {QUICK_GELU_ALPHA}")
    if k.get("hidden_act") != "silu":  # GptOss's experts never read it; the class default only
        refused.append(f"hidden_act={k.get('hidden_act')!r}: gpt-oss's experts ignore it (clamped SwiGLU); "
                       "refusing to guess")
    max_pos = k.get("max_position_embeddings")
    fields: Fields = {
        "num_layers": layers, "hidden_size": k.get("hidden_size"), "num_attention_heads": heads,
        "num_query_groups": k.get("num_key_value_heads"), "kv_channels": k.get("head_dim"),
        "ffn_hidden_size": k.get("intermediate_size"), "layernorm_epsilon": float(k.get("rms_norm_eps")),
        "normalization": "RMSNorm", "activation": "megatron.core.fusions.fused_bias_geglu:quick_gelu",
        "gated_linear_unit": True, "glu_linear_offset": 1.0, "activation_func_clamp_value": float(k.get("swiglu_limit")),
        "add_bias_linear": True, "add_qkv_bias": True, "qk_layernorm": False, "vocab_size": k.get("vocab_size"),
        "seq_length": max_pos, "share_embeddings_and_output_weights": bool(k.get("tie_word_embeddings")),
    }
    fields.update(rope_fields_from_hf(lambda key: _rope_raw(k, key), k.fail, max_pos, k.architecture,
                                      rope_theta_default=150000.0))
    windowed = [t == SLIDING for t in layer_types_of(k, layers)]
    window = window_fields(k, k.get("sliding_window"), windowed)
    if window:
        window["window_attn_skip_freq"] = compact_skip_freq(windowed)
    fields = read_moe(k, {**fields, **window}, experts_key="num_local_experts", alias="num_experts", ffn_key=None,
                      norm_topk=True)
    fields["softmax_type"] = "learnable"
    _published_extras(k)
    k.reject_leftovers()  # an unknown key is named first: what it changes is unknown, the rest is a known gap
    first, _ = refused[0].split(": ", 1)
    raise k.fail(first.split("=")[0], "gpt-oss cannot be converted; megatron-core 0.16.1 (as this family builds it) "
                 "cannot express: " + "; ".join(refused))


def _published_extras(k: ConfigReader) -> None:
    """Keys of the published files that GptOssConfig does not define and transformers never reads:
    ``experts_per_token`` (the same as ``num_experts_per_tok``, which must agree) and
    ``initial_context_length`` (the pre-yarn length; yarn's ``original_max_position_embeddings`` is the one used)."""
    per_token = k.raw("experts_per_token")
    if per_token is not None and per_token != k.get("num_experts_per_tok"):
        raise k.fail("experts_per_token", f"is {per_token!r} while num_experts_per_tok is {k.get('num_experts_per_tok')!r}")
    k.mark("initial_context_length")


def _rope_raw(k: ConfigReader, key: str) -> Any:
    """The file's RoPE keys; a file without any gets the class's own yarn default (``__post_init__``)."""
    value = k.raw(key)
    if key == "rope_parameters" and value is None and k.raw("rope_scaling") is None:
        return dict(DEFAULT_ROPE)
    return value


def _accept_quantization(k: ConfigReader) -> None:
    """Published gpt-oss ships MXFP4 experts: the key is understood (its values checked by the core's rules)."""
    from plugtron.conversion.quantization import MXFP4, accept

    accept(k, (MXFP4,))


def _write(f: Fields) -> dict[str, Any]:
    raise UnsupportedConfigError("architectures", "GptOssForCausalLM is refused on import (see plugtron_gpt.hf.gpt_oss); "
                                 "no megatron model can be exported as one")


def _derive(values: dict[str, Any]) -> None:
    """GptOssConfig: kv heads and head_dim from the heads, alternating layer types (sliding first)."""
    if values.get("num_local_experts") is None and values.get("num_experts") is not None:
        values["num_local_experts"] = values["num_experts"]
    derive_heads(values)
    if values["layer_types"] is None:
        values["layer_types"] = [SLIDING if (i + 1) % 2 else FULL for i in range(values["num_hidden_layers"])]


GPT_OSS = LLAMA.derive(
    name="GptOssForCausalLM", model_type="gpt_oss", config_class="GptOssConfig", read=_read, write=_write,
    schema=ConfigSchema(
        defaults={"num_hidden_layers": 36, "num_local_experts": 128, "vocab_size": 201088, "hidden_size": 2880,
                  "intermediate_size": 2880, "head_dim": 64, "num_attention_heads": 64, "num_key_value_heads": 8,
                  "sliding_window": 128, "tie_word_embeddings": False, "hidden_act": "silu",
                  "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "num_experts_per_tok": 4,
                  "swiglu_alpha": 1.702, "swiglu_limit": 7.0, "router_aux_loss_coef": 0.001,
                  "output_router_logits": False, "layer_types": None, "attention_bias": True},
        types={"num_local_experts": INT, "num_key_value_heads": INT, "head_dim": INT, "num_experts_per_tok": INT,
               "swiglu_alpha": FLOAT, "swiglu_limit": FLOAT, "router_aux_loss_coef": FLOAT,
               "output_router_logits": BOOL, "attention_bias": BOOL},
        derive=_derive),
    model_class="transformers:GptOssForCausalLM")

ADAPTER = GPTAdapter(GPT_OSS)
