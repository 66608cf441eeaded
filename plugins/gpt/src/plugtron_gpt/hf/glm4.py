"""``Glm4ForCausalLM`` (GLM-4-0414): GLM plus a norm on each sublayer's output ("sandwich").

A Glm4 layer computes ``h = h + post_self_attn_layernorm(attn(input_layernorm(h)))`` then
``h = h + post_mlp_layernorm(mlp(post_attention_layernorm(h)))``: the pre-norms of Llama
(HF's ``post_attention_layernorm`` is, despite its name, the pre-MLP norm) plus a norm on
each branch before its residual add, megatron's ``norm_placement='sandwich'``. Everything
else (fused gate_up, q/k/v biases, interleaved partial RoPE, the 0.5 default) is GLM's.
"""

from __future__ import annotations

from typing import Any

from plugtron.conversion import INT, ConfigReader, ConfigSchema, direct, layer

from .adapter import GPTAdapter
from .architecture import Fields
from .glm import GLM, GLM_DEFAULTS, read_glm, write_glm
from .rope import need_value

#: megatron names of the branch-output norms (``norm_placement`` sandwich / post).
POST_ATTN_NORM = "post_attention_layernorm.weight"
POST_MLP_NORM = "post_mlp_layernorm.weight"

TABLE = GLM.table + layer("model.layers.{i}.", [
    direct("post_self_attn_layernorm.weight", POST_ATTN_NORM, ("H",)),
    direct("post_mlp_layernorm.weight", POST_MLP_NORM, ("H",)),
])


def _read(k: ConfigReader) -> Fields:
    return {**read_glm(k), "norm_placement": "sandwich"}


def _write(f: Fields) -> dict[str, Any]:
    need_value(f, "norm_placement", ("sandwich",), GLM4.name, "pre")
    return write_glm(f, GLM4.name)


GLM4 = GLM.derive(
    name="Glm4ForCausalLM", model_type="glm4", config_class="Glm4Config", table=TABLE, read=_read, write=_write,
    # Glm4Config declares both as plain int (GlmConfig: int or null).
    schema=ConfigSchema(defaults=GLM_DEFAULTS, types={"num_key_value_heads": INT, "head_dim": INT}),
    expresses=frozenset({"rotary_interleaved", "norm_placement"}))

ADAPTER = GPTAdapter(GLM4)
