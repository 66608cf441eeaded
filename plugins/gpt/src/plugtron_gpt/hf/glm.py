"""``GlmForCausalLM`` (GLM-4-9b-chat-hf): Llama's decoder with a fused ``gate_up_proj``, q/k/v
biases only, and interleaved partial RoPE.

RoPE: transformers' GLM builds ``cos``/``sin`` for the first ``R = int(head_dim *
partial_rotary_factor)`` channels of each head, keeps their first ``R / 2`` frequencies and
repeats each one twice (``f0 f0 f1 f1 ...``), and rotates adjacent channel pairs
(``(-x1, x0), (-x3, x2) ...``); channels ``R:`` pass through. That is megatron's
``rotary_interleaved=True`` with ``rotary_percent = partial_rotary_factor`` (megatron also
rotates the first ``int(kv_channels * rotary_percent)`` channels and interleaves the same
frequencies), so no weight is permuted. ``partial_rotary_factor`` defaults to 0.5 in
``GlmConfig`` when a file does not give it, so export always writes it.

``gate_up_proj`` is stored ``[gate; up]`` (the MLP chunks it in that order), which is
megatron's ``linear_fc1`` layout. ``attention_bias`` puts biases on q/k/v only (``o_proj``
and the MLP never have one): megatron's ``add_qkv_bias`` without ``add_bias_linear``.
"""

from __future__ import annotations

from typing import Any

from plugtron.conversion import ConfigReader, ConfigSchema, fused_gate_up

from .adapter import GPTAdapter
from .architecture import Fields
from .llama import LLAMA, head_dim_of, read_decoder, write_decoder
from .rope import need_value, rope_parameters_to_hf

#: GlmConfig's default when neither ``partial_rotary_factor`` nor the RoPE block gives one.
GLM_PARTIAL_ROTARY = 0.5
_LAYER = "decoder.layers.{i}."

TABLE = (LLAMA.table
         .replace(_LAYER + "mlp.linear_fc1.weight",
                  lambda r: fused_gate_up("model.layers.{i}.mlp.gate_up_proj.weight", r.megatron, ("F2", "H")))
         .without(*(_LAYER + n for n in ("mlp.linear_fc1.bias", "mlp.linear_fc2.bias",
                                         "self_attention.linear_proj.bias", "self_attention.q_layernorm.weight",
                                         "self_attention.k_layernorm.weight"))))

GLM_DEFAULTS = {"vocab_size": 151552, "hidden_size": 4096, "intermediate_size": 13696, "num_hidden_layers": 40,
                "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128, "hidden_act": "silu",
                "max_position_embeddings": 131072, "rms_norm_eps": 1.5625e-07, "tie_word_embeddings": False,
                "attention_bias": True}


def _partial_given(cfg: Any) -> bool:
    """Whether the file sets ``partial_rotary_factor`` (top level or in its RoPE block)."""
    blocks = [cfg.get(key) for key in ("rope_parameters", "rope_scaling")]
    return (cfg.get("partial_rotary_factor") is not None
            or any(isinstance(b, dict) and b.get("partial_rotary_factor") is not None for b in blocks))


def read_glm(k: ConfigReader) -> Fields:
    """The fields of a GLM-4 config; Glm4 adds its norms on top."""
    for key in ("head_dim", "num_key_value_heads"):  # GlmAttention reads both as they are, None included
        if k.get(key) is None:
            raise k.fail(key, "is null; transformers' GLM attention cannot be built without it")
    fields = read_decoder(k, add_bias_linear=False, add_qkv_bias=bool(k.get("attention_bias")), qk_layernorm=False,
                          partial_rotary=True)
    if fields["position_embedding_type"] == "yarn":
        src = "rope_parameters" if k.cfg.get("rope_parameters") is not None else "rope_scaling"
        raise k.fail(f"{src}.rope_type", "is 'yarn'; megatron's YaRN rotates every channel in rotate-half layout, "
                                         "GLM rotates part of them interleaved")
    if not _partial_given(k.cfg):
        fields["rotary_percent"] = GLM_PARTIAL_ROTARY
    fields["rotary_interleaved"] = True
    return fields


def write_glm(f: Fields, arch: str) -> dict[str, Any]:
    need_value(f, "add_bias_linear", (False,), arch, True)
    need_value(f, "rotary_interleaved", (True,), arch, False)
    out = {**write_decoder(f, arch, qk_layernorm=False, partial_rotary=True), "head_dim": head_dim_of(f),
           "attention_bias": bool(f.get("add_qkv_bias", False))}
    # Written even at 1.0: absent, GlmConfig would take 0.5.
    out["rope_parameters"] = {**rope_parameters_to_hf(f, arch, partial_rotary=True),
                              "partial_rotary_factor": float(f.get("rotary_percent", 1.0))}
    return out


GLM = LLAMA.derive(
    name="GlmForCausalLM", model_type="glm", config_class="GlmConfig", table=TABLE,
    read=read_glm, write=lambda f: write_glm(f, GLM.name),
    schema=ConfigSchema(defaults=GLM_DEFAULTS),
    expresses=frozenset({"rotary_interleaved"}))

ADAPTER = GPTAdapter(GLM)
