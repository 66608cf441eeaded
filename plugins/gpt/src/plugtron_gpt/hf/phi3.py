"""``Phi3ForCausalLM`` (Phi-3, Phi-3.5-mini, Phi-4-mini): Llama's layout with fused projections.

* ``self_attn.qkv_proj`` stores ``[q; k; v]`` (all q heads, then k, then v):
  the ``fused_qkv`` rule regroups it per query group for megatron.
* ``mlp.gate_up_proj`` stores ``[gate; up]`` (transformers chunks it in two,
  gate first), megatron's own ``linear_fc1`` layout: ``fused_gate_up``.
* ``partial_rotary_factor`` (Phi-4-mini: 0.75) is megatron's ``rotary_percent``;
  ``sliding_window`` applies to every layer (Phi-3-mini-4k: 2047).
* RoPE scaling: Phi-3's config class accepts only ``default`` and
  ``longrope`` and renames the older ``su`` and ``yarn`` to ``longrope``
  (so ``yarn`` here is *not* YaRN). LongRoPE rescales each frequency by
  ``short_factor`` or ``long_factor`` depending on the sequence length, which
  megatron cannot express: refused by name.
"""

from __future__ import annotations

from typing import Any

from plugtron.conversion import INT, ConfigReader, ConfigSchema, direct, fused_gate_up, fused_qkv, layer, table, vocab_rows

from .adapter import GPTAdapter
from .architecture import Fields, HFArchitecture
from .llama import (DEFAULTS, WINDOW, head_dim_of, read_decoder, read_uniform_window, uniform_window_to_hf,
                    write_decoder)
from .rope import need_value

TABLE = table(
    vocab_rows("model.embed_tokens.weight", "embedding.word_embeddings.weight"),
    direct("model.norm.weight", "decoder.final_layernorm.weight", ("H",)),
    vocab_rows("lm_head.weight", "output_layer.weight", when="not share_embeddings_and_output_weights"),
    layer("model.layers.{i}.", [
        direct("input_layernorm.weight", "{in_w}", ("H",)),
        fused_qkv("self_attn.qkv_proj.weight", "self_attention.linear_qkv.weight", ("QKV", "H")),
        direct("self_attn.o_proj.weight", "self_attention.linear_proj.weight", ("H", "Q")),
        direct("post_attention_layernorm.weight", "{mlp_w}", ("H",)),
        fused_gate_up("mlp.gate_up_proj.weight", "mlp.linear_fc1.weight", ("F2", "H")),
        direct("mlp.down_proj.weight", "mlp.linear_fc2.weight", ("H", "F")),
    ]),
)


def _refuse_longrope(k: ConfigReader) -> None:
    for key in ("rope_scaling", "rope_parameters"):
        block = k.raw(key)
        if not isinstance(block, dict):
            continue
        name = "rope_type" if "rope_type" in block else "type"
        kind = block.get(name)
        if kind not in (None, "default"):
            raise k.fail(f"{key}.{name}", f"is {kind!r}: Phi-3 reads su/yarn/longrope as LongRoPE (per-frequency "
                                          "short/long factors switched by sequence length), which megatron cannot express")


def _read(k: ConfigReader) -> Fields:
    _refuse_longrope(k)
    k.mark("original_max_position_embeddings")  # read by LongRoPE only (refused above)
    fields = read_decoder(k, add_bias_linear=False, add_qkv_bias=False, qk_layernorm=False, partial_rotary=True)
    return {**fields, **read_uniform_window(k, fields["num_layers"])}


def _write(f: Fields) -> dict[str, Any]:
    arch = PHI3.name
    need_value(f, "add_bias_linear", (False,), arch, True)
    need_value(f, "add_qkv_bias", (False,), arch, False)
    out = {**write_decoder(f, arch, qk_layernorm=False, partial_rotary=True),
           "sliding_window": uniform_window_to_hf(f, arch)}
    if head_dim_of(f) != f["hidden_size"] // f["num_attention_heads"]:
        out["head_dim"] = head_dim_of(f)
    return out


def _derive(values: dict[str, Any]) -> None:
    if values["num_key_value_heads"] is None:
        values["num_key_value_heads"] = values["num_attention_heads"]


PHI3 = HFArchitecture(
    name="Phi3ForCausalLM", model_type="phi3", config_class="Phi3Config", read=_read, write=_write, table=TABLE,
    expresses=WINDOW,
    schema=ConfigSchema(
        defaults={**DEFAULTS, "vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192,
                  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": None,
                  "max_position_embeddings": 4096, "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
                  "tie_word_embeddings": False, "sliding_window": None},
        types={"original_max_position_embeddings": INT}, derive=_derive,
        # auto_map: Microsoft's files point to their original remote code, which transformers uses only with
        # trust_remote_code; by default (and in plugtron verify) it builds its own Phi3ForCausalLM, read here.
        non_numeric=frozenset({"resid_pdrop", "embd_pdrop", "auto_map"}),
        # Phi-3-mini-4k-instruct's file: a key Phi-3 never reads (its projections have no biases).
        harmless_at={"attention_bias": False}))

ADAPTER = GPTAdapter(PHI3)
