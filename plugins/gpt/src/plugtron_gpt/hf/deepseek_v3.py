"""``DeepseekV3ForCausalLM`` (DeepSeek-V3, Kimi-K2, Moonlight): Multi-Latent Attention and a sigmoid router.

What decides parity (each measured by breaking it, see the project notes):

* **MLA** tensors are megatron's one to one: ``q_a_proj`` / ``q_a_layernorm`` /
  ``q_b_proj`` (or ``q_proj`` without ``q_lora_rank``) -> ``linear_q_down_proj`` /
  ``q_layernorm`` / ``linear_q_up_proj`` (``linear_q_proj``); ``kv_a_proj_with_mqa``
  ``[latent; k_rope]`` -> ``linear_kv_down_proj``, ``kv_a_layernorm`` ->
  ``kv_layernorm``, ``kv_b_proj`` (per head ``[k_nope; v]``) -> ``linear_kv_up_proj``.
  Both latent norms are megatron's ``qk_layernorm``. megatron's MLA de-interleaves its
  rotary channels itself, which is HF's ``rope_interleave=True`` path: the rows are
  copied. ``rope_interleave=False`` would need the rotary rows re-ordered and is
  refused by name.
* **YaRN** keeps ``mscale`` and ``mscale_all_dim``: HF scales the softmax by
  ``mscale(factor, mscale_all_dim)^2`` as megatron's MLA does, and the cos/sin by
  ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)``. An ``mscale_all_dim``
  without ``mscale`` (HF then scales cos/sin by ``mscale(factor)`` alone) has no
  megatron equivalent and is refused.
* **Router**: sigmoid scores, ``e_score_correction_bias`` -> ``router.expert_bias``
  (aux-loss-free bias, a buffer), ``routed_scaling_factor`` ->
  ``moe_router_topk_scaling_factor``, ``n_group`` / ``topk_group`` ->
  ``moe_router_num_groups`` / ``moe_router_group_topk``. Two HF cases megatron
  cannot express are refused naming the field: ``norm_topk_prob=false`` (megatron
  always renormalises sigmoid top-k scores) and group scores over anything but
  the top-2 of a group (megatron sums the top ``topk // topk_group``).
* ``quantization_config``: block-scaled FP8 (published DeepSeek-V3, Kimi-K2) is accepted and
  dequantised by the engine on import (:mod:`plugtron.conversion.quantization`); other schemes
  are refused by name.
* ``first_k_dense_replace`` dense layers, then MoE layers each with
  ``n_shared_experts * moe_intermediate_size`` wide shared experts.

MTP layers (``num_nextn_predict_layers``) are stored by published checkpoints as
``model.layers.{num_hidden_layers + m}``; :func:`decoder_with_mtp` maps them to megatron's
``mtp.layers.{m}`` when ``mtp_num_layers`` is set, and :data:`MTP_COPIES` names the
embedding / head copies each stores (megatron shares those; export writes them back).
The reader leaves ``mtp_num_layers`` unset: transformers writes
``num_nextn_predict_layers: 1`` into checkpoints it saves without MTP tensors, so only
the checkpoint's tensors can size it (the engine's job); a checkpoint that carries MTP
tensors converted without MTP is refused by the engine's unused-tensor check, naming
them, never dropped silently. Export writes ``num_nextn_predict_layers = mtp_num_layers``.
"""

from __future__ import annotations

from typing import Any

from plugtron.conversion import (BOOL, FLOAT, INT, OPT_INT, ConfigReader, ConfigSchema, Rule, Table,
                                 UnsupportedConfigError, direct, for_layers, gated_fc1, layer, table,
                                 vocab_rows)
from plugtron.conversion.quantization import accept

from .adapter import GPTAdapter
from .architecture import Fields, HFArchitecture
from .llama import HF_ACTIVATIONS, activation
from .qwen3_moe import expert_rules
from .rope import need_value, rope_fields_from_hf, rope_parameters_to_hf

_A = "self_attn."
#: Multi-Latent Attention of one layer (short names; ``QL`` etc. are :func:`~.adapter.mla_symbols`).
MLA_LAYER = [
    direct("input_layernorm.weight", "{in_w}", ("H",)),
    direct(_A + "q_a_proj.weight", "self_attention.linear_q_down_proj.weight", ("QL", "H"), when="q_lora_rank"),
    direct(_A + "q_a_layernorm.weight", "self_attention.q_layernorm.weight", ("QL",), when="q_lora_rank"),
    direct(_A + "q_b_proj.weight", "self_attention.linear_q_up_proj.weight", ("QUP", "QL"), when="q_lora_rank"),
    direct(_A + "q_proj.weight", "self_attention.linear_q_proj.weight", ("QUP", "H"), when="not q_lora_rank"),
    direct(_A + "kv_a_proj_with_mqa.weight", "self_attention.linear_kv_down_proj.weight", ("KVD", "H")),
    direct(_A + "kv_a_layernorm.weight", "self_attention.kv_layernorm.weight", ("KVL",)),
    direct(_A + "kv_b_proj.weight", "self_attention.linear_kv_up_proj.weight", ("KVUP", "KVL")),
    direct(_A + "o_proj.weight", "self_attention.linear_proj.weight", ("H", "VO")),
]
DENSE_MLP = for_layers("dense", [
    direct("post_attention_layernorm.weight", "{mlp_w}", ("H",)),
    gated_fc1("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.linear_fc1.weight", ("F", "H")),
    direct("mlp.down_proj.weight", "mlp.linear_fc2.weight", ("H", "F")),
])
SHARED_EXPERTS = [
    gated_fc1("mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight",
              "mlp.shared_experts.linear_fc1.weight", ("FS", "H")),
    direct("mlp.shared_experts.down_proj.weight", "mlp.shared_experts.linear_fc2.weight", ("H", "FS")),
]
EXPERT_BIAS = [direct("mlp.gate.e_score_correction_bias", "mlp.router.expert_bias", ("E",),
                      when="moe_router_enable_expert_bias")]
MOE_MLP = for_layers("moe", expert_rules() + SHARED_EXPERTS + EXPERT_BIAS)
LAYER = MLA_LAYER + DENSE_MLP + MOE_MLP

#: MTP layer ``m`` as published (``model.layers.{num_hidden_layers + m}``); its ``embed_tokens`` and
#: ``shared_head.head`` are copies of the model's embedding and output layer (megatron shares those).
MTP_COPIES = (("model.layers.{n}.embed_tokens.weight", "model.embed_tokens.weight"),
              ("model.layers.{n}.shared_head.head.weight", "lm_head.weight"))


def decoder_with_mtp(layer_rules: list[Rule]) -> Table:
    """Embedding, final norm, output layer, the decoder layers, and the MTP layers stored after them
    (each a full decoder layer of the same rules plus its own norms and ``eh_proj``)."""
    mtp = layer("model.layers.{n}.", [
        direct("enorm.weight", "enorm.weight", ("H",)),
        direct("hnorm.weight", "hnorm.weight", ("H",)),
        direct("eh_proj.weight", "eh_proj.weight", ("H", "H2")),
        direct("shared_head.norm.weight", "final_layernorm.weight", ("H",)),
    ], "mtp.layers.{m}.") + layer("model.layers.{n}.", layer_rules, "mtp.layers.{m}.transformer_layer.")
    return table(
        vocab_rows("model.embed_tokens.weight", "embedding.word_embeddings.weight"),
        direct("model.norm.weight", "decoder.final_layernorm.weight", ("H",)),
        vocab_rows("lm_head.weight", "output_layer.weight", when="not share_embeddings_and_output_weights"),
        layer("model.layers.{i}.", layer_rules),
        mtp,
    )


TABLE = decoder_with_mtp(LAYER)

#: Keys of the original DeepSeek code that published files carry; transformers' DeepSeek-V3 reads none of them.
HARMLESS = {"ep_size": 1, "moe_layer_freq": 1, "scoring_func": "sigmoid", "topk_method": "noaux_tc"}
TYPES = {"n_routed_experts": INT, "n_shared_experts": INT, "num_experts_per_tok": OPT_INT, "moe_intermediate_size": INT,
         "routed_scaling_factor": FLOAT, "kv_lora_rank": INT, "q_lora_rank": OPT_INT, "qk_rope_head_dim": INT,
         "v_head_dim": OPT_INT, "qk_nope_head_dim": INT, "n_group": OPT_INT, "topk_group": OPT_INT,
         "first_k_dense_replace": OPT_INT, "norm_topk_prob": BOOL, "rope_interleave": BOOL, "output_router_logits": BOOL,
         "num_mtp_layers": INT}


def read_mla(k: ConfigReader) -> Fields:
    """Sizes, norms, MLA and RoPE fields shared by DeepSeek-V2 and V3."""
    if k.get("attention_bias"):
        raise k.fail("attention_bias", "DeepSeek puts biases on q_a/kv_a/o_proj only, which megatron's MLA cannot express")
    accept(k)  # block-scaled FP8 (DeepSeek-V3, Kimi-K2): the engine dequantises it on import; others refused
    k.mark("num_key_value_heads", "pretraining_tp")  # MLA: every head has its own k/v
    max_pos = k.get("max_position_embeddings")
    rope = {**(k.raw("rope_scaling") or {}), **(k.raw("rope_parameters") or {})}
    if rope.get("mscale_all_dim") and not rope.get("mscale"):
        raise k.fail("rope_parameters.mscale_all_dim", f"is {rope['mscale_all_dim']} without mscale: HF then scales "
                                                       "cos/sin by mscale(factor) alone, which megatron's YaRN cannot")
    fields = {
        "num_layers": k.get("num_hidden_layers"), "hidden_size": k.get("hidden_size"),
        "ffn_hidden_size": k.get("intermediate_size"), "num_attention_heads": k.get("num_attention_heads"),
        "layernorm_epsilon": float(k.get("rms_norm_eps")), "normalization": "RMSNorm", "activation": activation(k),
        "gated_linear_unit": True, "add_bias_linear": False, "add_qkv_bias": False, "qk_layernorm": True,
        "vocab_size": k.get("vocab_size"), "seq_length": max_pos,
        "share_embeddings_and_output_weights": bool(k.get("tie_word_embeddings")),
        "multi_latent_attention": True, "q_lora_rank": k.get("q_lora_rank"), "kv_lora_rank": k.get("kv_lora_rank"),
        "qk_head_dim": k.get("qk_nope_head_dim"), "qk_pos_emb_head_dim": k.get("qk_rope_head_dim"),
        "v_head_dim": k.get("v_head_dim"),
    }
    # Saved configs carry what __post_init__ derives; transformers recomputes both, so a different value is a
    # file whose writer meant something else.
    for key, derived in (("qk_head_dim", fields["qk_head_dim"] + fields["qk_pos_emb_head_dim"]),
                         ("head_dim", fields["qk_pos_emb_head_dim"])):
        if k.raw(key) not in (None, derived):
            raise k.fail(key, f"is {k.raw(key)}; transformers derives {derived} from the qk_*_head_dim keys")
    fields.update(rope_fields_from_hf(k.raw, k.fail, max_pos, k.architecture))
    if fields.get("rope_scaling") or fields.get("seq_len_interpolation_factor") is not None:
        kind = "llama3" if fields.get("rope_scaling") else "linear"
        raise k.fail("rope_parameters.rope_type", f"is {kind!r}; megatron's MLA applies plain or YaRN RoPE only")
    return fields


def dense_then_moe(k: ConfigReader, layers: int) -> list[int]:
    first = k.get("first_k_dense_replace") or 0
    if not 0 <= first < layers:
        raise k.fail("first_k_dense_replace", f"is {first}; it must leave at least one of {layers} layers MoE")
    return [0] * first + [1] * (layers - first)


def read_experts(k: ConfigReader, fields: Fields) -> Fields:
    """Routed and shared experts (``n_routed_experts``, ``n_shared_experts``, ``first_k_dense_replace``)."""
    experts, topk, shared = k.get("n_routed_experts"), k.get("num_experts_per_tok"), k.get("n_shared_experts")
    if experts < 1:
        raise k.fail("n_routed_experts", f"is {experts}; a model without routed experts is not this architecture")
    if topk is None or not 1 <= topk <= experts:
        raise k.fail("num_experts_per_tok", f"is {topk}; it must be between 1 and n_routed_experts={experts}")
    if shared < 1:
        raise k.fail("n_shared_experts", f"is {shared}; zero-width shared expert tensors have no megatron equivalent")
    k.mark("output_router_logits", "aux_loss_alpha", "seq_aux")  # training-only losses
    pattern = dense_then_moe(k, fields["num_layers"])
    ffn = k.get("moe_intermediate_size")
    return {**fields, "num_moe_experts": experts, "moe_router_topk": topk, "moe_ffn_hidden_size": ffn,
            "moe_shared_expert_intermediate_size": shared * ffn,
            "moe_layer_freq": 1 if all(pattern) else pattern}


def _groups(k: ConfigReader, experts: int, topk: int, group_score_topk: int) -> dict[str, Any]:
    """``n_group`` / ``topk_group``; HF's group score sums its top ``group_score_topk`` experts."""
    groups, keep = k.get("n_group"), k.get("topk_group")
    if not groups or groups == 1:
        return {"moe_router_num_groups": None, "moe_router_group_topk": None}
    if experts % groups:
        raise k.fail("n_group", f"is {groups}; it must divide n_routed_experts={experts}")
    if not keep or not 1 <= keep <= groups:
        raise k.fail("topk_group", f"is {keep}; it must be between 1 and n_group={groups}")
    if topk // keep != group_score_topk:
        raise k.fail("topk_group", f"is {keep} with num_experts_per_tok={topk}: megatron scores a group by its top "
                                   f"{topk // keep} experts, HF by its top {group_score_topk}; not expressible")
    return {"moe_router_num_groups": groups, "moe_router_group_topk": keep}


def read_sigmoid_router(k: ConfigReader, fields: Fields) -> Fields:
    """DeepSeek-V3's router (GLM-4.5 has the same): sigmoid, expert bias, top-2 group scores, renormalised."""
    if not k.get("norm_topk_prob"):
        raise k.fail("norm_topk_prob", "is False: megatron always renormalises the sigmoid top-k scores")
    k.mark("num_mtp_layers", "num_nextn_predict_layers")  # MTP weights: see the module docstring
    experts, topk = fields["num_moe_experts"], fields["moe_router_topk"]
    return {**fields, **_groups(k, experts, topk, 2), "moe_router_score_function": "sigmoid",
            "moe_router_pre_softmax": False, "moe_router_enable_expert_bias": True,
            "moe_router_topk_scaling_factor": float(k.get("routed_scaling_factor"))}


def write_sigmoid_router(f: Fields, arch: str) -> dict[str, Any]:
    need_value(f, "moe_router_score_function", ("sigmoid",), arch, "softmax")
    need_value(f, "moe_router_enable_expert_bias", (True,), arch, False)
    need_value(f, "moe_router_pre_softmax", (False,), arch, True)
    groups, keep, topk = f.get("moe_router_num_groups"), f.get("moe_router_group_topk"), f.get("moe_router_topk", 2)
    if groups and topk // keep != 2:
        raise UnsupportedConfigError("moe_router_group_topk", f"is {keep} with moe_router_topk={topk}: HF scores a "
                                     "group by its top-2 experts, megatron by its top topk // group_topk")
    scale = f.get("moe_router_topk_scaling_factor")
    return {"n_group": groups or 1, "topk_group": keep or 1, "norm_topk_prob": True,
            "routed_scaling_factor": 1.0 if scale is None else float(scale),
            "num_mtp_layers": f.get("mtp_num_layers") or 0}


def _read(k: ConfigReader) -> Fields:
    if not k.get("rope_interleave"):
        raise k.fail("rope_interleave", "is False: megatron's MLA expects interleaved rotary rows; re-ordering them "
                                        "is not supported")
    return read_sigmoid_router(k, read_experts(k, read_mla(k)))


def write_mla(f: Fields, arch: str) -> dict[str, Any]:
    """Config keywords of the MLA decoder shared by DeepSeek-V2 and V3."""
    need_value(f, "multi_latent_attention", (True,), arch, False)
    need_value(f, "normalization", ("RMSNorm",), arch, "LayerNorm")
    need_value(f, "gated_linear_unit", (True,), arch, False)
    need_value(f, "add_bias_linear", (False,), arch, True)
    need_value(f, "qk_layernorm", (True,), arch, False)
    act = need_value(f, "activation", tuple(HF_ACTIVATIONS), arch)
    heads = f["num_attention_heads"]
    return dict(
        vocab_size=f["vocab_size"], hidden_size=f["hidden_size"], intermediate_size=f["ffn_hidden_size"],
        num_hidden_layers=f["num_layers"], num_attention_heads=heads, num_key_value_heads=heads,
        hidden_act=HF_ACTIVATIONS[act], max_position_embeddings=f["seq_length"], rms_norm_eps=f["layernorm_epsilon"],
        tie_word_embeddings=bool(f.get("share_embeddings_and_output_weights")), attention_bias=False,
        q_lora_rank=f.get("q_lora_rank"), kv_lora_rank=f["kv_lora_rank"], qk_nope_head_dim=f["qk_head_dim"],
        qk_rope_head_dim=f["qk_pos_emb_head_dim"], v_head_dim=f["v_head_dim"],
        rope_parameters=rope_parameters_to_hf(f, arch))


def write_experts(f: Fields, arch: str) -> dict[str, Any]:
    """Routed / shared experts and the dense-first layer pattern (router keys are the caller's)."""
    pattern = [1 if i % f["moe_layer_freq"] == 0 else 0 for i in range(f["num_layers"])] \
        if isinstance(f.get("moe_layer_freq", 1), int) else list(f["moe_layer_freq"])
    first = pattern.index(1) if 1 in pattern else len(pattern)
    if pattern != [0] * first + [1] * (len(pattern) - first):
        raise UnsupportedConfigError("moe_layer_freq", f"is {f['moe_layer_freq']!r}; {arch} has dense layers first, "
                                                       "then only MoE layers (first_k_dense_replace)")
    ffn, shared = f.get("moe_ffn_hidden_size") or f["ffn_hidden_size"], f.get("moe_shared_expert_intermediate_size")
    if not shared or shared % ffn:
        raise UnsupportedConfigError("moe_shared_expert_intermediate_size",
                                     f"is {shared!r}; {arch} needs a multiple of moe_ffn_hidden_size={ffn}")
    need_value(f, "moe_shared_expert_gate", (False, None), arch, False)
    return dict(n_routed_experts=f["num_moe_experts"], num_experts_per_tok=f.get("moe_router_topk", 2),
                moe_intermediate_size=ffn, n_shared_experts=shared // ffn, first_k_dense_replace=first)


def _write(f: Fields) -> dict[str, Any]:
    arch = DEEPSEEK_V3.name
    return {**write_mla(f, arch), **write_experts(f, arch), **write_sigmoid_router(f, arch), "rope_interleave": True}


DEFAULTS = {
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
    "n_routed_experts": 256, "output_router_logits": False, "routed_scaling_factor": 2.5, "kv_lora_rank": 512,
    "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8,
    "topk_group": 4, "num_experts_per_tok": 8, "first_k_dense_replace": 3, "norm_topk_prob": True, "hidden_act": "silu",
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_interleave": True,
    "attention_bias": False, "num_mtp_layers": 1,
}


def derive_mla(values: dict[str, Any]) -> None:
    """What the DeepSeek config classes compute in ``__post_init__``."""
    if values.get("num_key_value_heads") is None:
        values["num_key_value_heads"] = values["num_attention_heads"]
    values["head_dim"] = values["qk_rope_head_dim"]


def _derive(values: dict[str, Any]) -> None:
    if "num_nextn_predict_layers" in values:  # attribute_map: the published spelling of num_mtp_layers
        values["num_mtp_layers"] = values["num_nextn_predict_layers"]
    derive_mla(values)


DEEPSEEK_V3 = HFArchitecture(
    name="DeepseekV3ForCausalLM", model_type="deepseek_v3", config_class="DeepseekV3Config",
    schema=ConfigSchema(defaults=DEFAULTS, types=TYPES, derive=_derive,
                        non_numeric=frozenset({"pretraining_tp", "auto_map"}), harmless_at=HARMLESS),
    read=_read, write=_write, table=TABLE,
    expresses=frozenset({"num_moe_experts", "multi_latent_attention", "mtp_num_layers"}))

#: Kimi-K2's config.json says ``model_type: kimi_k2`` with DeepSeek-V3's classes (its remote code is DeepSeek-V3's).
ADAPTER = GPTAdapter(DEEPSEEK_V3, mtp_copies=MTP_COPIES, other_model_types=("kimi_k2",))
