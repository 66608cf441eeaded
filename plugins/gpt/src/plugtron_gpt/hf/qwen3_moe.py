"""``Qwen3MoeForCausalLM``: Qwen3's attention with routed-expert MLPs, and the MoE helpers the others share.

The MoE architectures here (Qwen3-MoE, Mixtral, OLMoE, Qwen2-MoE) differ only in
names and a few router switches, so this module keeps the shared halves:

* :func:`expert_rules`: router and per-expert tensors. One mapping per expert
  (``{e}``), so import reads and export writes one expert at a time, and a
  rank of an expert-parallel layout touches only its own experts' bytes.
  megatron's ``linear_fc1`` of an expert is ``[gate; up]``, ``linear_fc2`` is
  ``down`` (the order decides parity: 1.66 logits error when swapped).
* :func:`moe_table`: a dense table whose MLP rules apply to dense layers only,
  plus expert rules for MoE layers. A MoE layer's pre-MLP norm is its own
  ``pre_mlp_layernorm`` in every layer spec (transformer-engine fuses the
  norm into ``linear_fc1`` only for dense MLPs).
* :func:`read_moe` / :func:`write_moe`: the router translation. HF's
  ``norm_topk_prob`` renormalises the top-k softmax probabilities; megatron does
  that unless ``moe_router_pre_softmax`` (softmax over all experts, top-k kept
  as is), so ``moe_router_pre_softmax = not norm_topk_prob``. Which layers are
  MoE (``decoder_sparse_step``: layer i when ``(i + 1) % step == 0``, minus
  ``mlp_only_layers``) becomes megatron's per-layer ``moe_layer_freq`` list
  (megatron's integer form counts ``i % n == 0``, a different pattern).
  ``router_aux_loss_coef`` and ``output_router_logits`` only add a training
  loss in transformers (its formula is not megatron's per-layer aux loss):
  they are understood and not translated.

Qwen3-MoE itself: Qwen3's attention (per-head q/k norms, ``head_dim`` read
from the file although it is no Qwen3MoeConfig field), and with
``use_sliding_window`` one window on every layer (megatron's ``window_size``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from plugtron.conversion import (BOOL, FLOAT, INT, ConfigReader, ConfigSchema, Table, UnsupportedConfigError, direct,
                                 for_layers, gated_fc1, layer)

from .adapter import GPTAdapter
from .architecture import Fields
from .llama import WINDOW, head_dim_of, read_decoder, read_uniform_window, uniform_window_to_hf, write_decoder
from .qwen3 import QWEN3
from .rope import need_value

_L = "decoder.layers.{i}."
#: The dense MLP rules of Llama's table (``{mlp_w}``: the layer spec's pre-MLP norm name).
DENSE_MLP = tuple(_L + n for n in ("{mlp_w}", "mlp.linear_fc1.weight", "mlp.linear_fc1.bias", "mlp.linear_fc2.weight",
                                   "mlp.linear_fc2.bias"))
#: Types of the MoE config keys (transformers' strict validation).
MOE_TYPES = {"num_experts": INT, "num_local_experts": INT, "num_experts_per_tok": INT, "moe_intermediate_size": INT,
             "decoder_sparse_step": INT, "norm_topk_prob": BOOL, "output_router_logits": BOOL,
             "router_aux_loss_coef": FLOAT, "router_jitter_noise": FLOAT, "shared_expert_intermediate_size": INT}
#: megatron router settings no HF MoE architecture here expresses, at the value each needs.
ROUTER_DEFAULTS = {"moe_router_score_function": "softmax", "moe_router_topk_scaling_factor": None,
                   "moe_router_num_groups": None, "moe_router_group_topk": None,
                   "moe_router_enable_expert_bias": False}


def expert_rules(block: str = "mlp", gate: str = "gate_proj", up: str = "up_proj", down: str = "down_proj",
                 router: str = "gate") -> list:
    """Pre-MLP norm, router and routed-expert rules of one MoE layer (HF names under ``model.layers.{i}.``)."""
    experts = f"{block}.experts.{{e}}."
    return [
        direct("post_attention_layernorm.weight", "pre_mlp_layernorm.weight", ("H",)),
        direct(f"{block}.{router}.weight", "mlp.router.weight", ("E", "H")),
        gated_fc1(f"{experts}{gate}.weight", f"{experts}{up}.weight", "mlp.experts.local_experts.{e}.linear_fc1.weight",
                  ("FE", "H")),
        direct(f"{experts}{down}.weight", "mlp.experts.local_experts.{e}.linear_fc2.weight", ("H", "FE")),
    ]


def moe_table(dense: Table, moe_rules: list) -> Table:
    """``dense`` with its MLP rules limited to dense layers, plus ``moe_rules`` (short names) for MoE layers."""
    table = dense
    for name in DENSE_MLP:
        if name in {r.megatron for r in table}:
            table = table.replace(name, lambda r: dataclasses.replace(r, layers="dense"))
    return table + for_layers("moe", layer("model.layers.{i}.", moe_rules))


def derive_experts(canonical: str, alias: str) -> Callable[[dict[str, Any]], None]:
    """transformers maps ``alias`` onto ``canonical`` (``attribute_map``): a file may spell either."""
    def derive(values: dict[str, Any]) -> None:
        if alias in values:
            values[canonical] = values[alias]
    return derive


def moe_pattern(k: ConfigReader, layers: int) -> list[int]:
    """1 per MoE layer: transformers' rule ``i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0``."""
    step, dense = k.get("decoder_sparse_step"), k.get("mlp_only_layers") or []
    if step < 1:
        raise k.fail("decoder_sparse_step", f"is {step}; transformers needs a positive step")
    if not isinstance(dense, list) or any(not isinstance(i, int) or isinstance(i, bool) for i in dense):
        raise k.fail("mlp_only_layers", f"{dense!r:.80} must be a list of layer indices")
    return [0 if i in dense or (i + 1) % step else 1 for i in range(layers)]


def read_moe(k: ConfigReader, fields: Fields, *, experts_key: str, alias: str | None, ffn_key: str | None,
             norm_topk: bool | None = None, pattern: list[int] | None = None) -> Fields:
    """The MoE fields of ``config.json`` added to ``fields`` (``norm_topk``: fixed by the architecture, else read)."""
    experts, topk = k.get(experts_key), k.get("num_experts_per_tok")
    if alias is not None:
        both = k.raw(experts_key), k.raw(alias)
        if None not in both and both[0] != both[1]:
            raise k.fail(alias, f"is {both[1]} while {experts_key} is {both[0]}; transformers would pick one silently")
    if experts < 1:
        raise k.fail(experts_key, f"is {experts}; a model without routed experts is not this architecture's MoE")
    if not 1 <= topk <= experts:
        raise k.fail("num_experts_per_tok", f"is {topk}; it must be between 1 and {experts_key}={experts}")
    norm = k.get("norm_topk_prob") if norm_topk is None else norm_topk
    if topk == 1 and norm:  # a softmax over one selected logit: megatron refuses it (zero router gradient)
        raise k.fail("num_experts_per_tok" if norm_topk else "norm_topk_prob",
                     "top-1 routing renormalised to probability 1 is not megatron's top-1 routing "
                     "(it needs pre-softmax scores with moe_router_topk=1)")
    k.mark("router_aux_loss_coef", "output_router_logits")  # training-only: see the module docstring
    pattern = pattern if pattern is not None else [1] * fields["num_layers"]
    if not any(pattern):
        raise k.fail("mlp_only_layers", "leaves no MoE layer; convert a dense model with its dense architecture")
    ffn = fields["ffn_hidden_size"] if ffn_key is None else k.get(ffn_key)
    return {**fields, "num_moe_experts": experts, "moe_router_topk": topk, "moe_router_pre_softmax": not norm,
            "moe_ffn_hidden_size": ffn, "moe_layer_freq": 1 if all(pattern) else pattern}


def layer_pattern(f: Fields) -> list[int]:
    freq, layers = f.get("moe_layer_freq", 1), f["num_layers"]
    return [1 if i % freq == 0 else 0 for i in range(layers)] if isinstance(freq, int) else list(freq)


def write_moe(f: Fields, arch: str, *, experts_key: str, ffn_key: str | None, norm_key: str | None = "norm_topk_prob",
              sparse_keys: bool = True, shared: bool = False) -> dict[str, Any]:
    """Config-class keywords for the MoE fields; refuses what ``arch`` cannot express, by field name."""
    if not f.get("num_moe_experts"):
        raise UnsupportedConfigError("num_moe_experts", f"is {f.get('num_moe_experts')!r}; {arch} needs routed experts")
    for key, default in ROUTER_DEFAULTS.items():
        need_value(f, key, (default,), arch, default)
    if not shared:
        need_value(f, "moe_shared_expert_intermediate_size", (None,), arch, None)
    topk, pre_softmax = f.get("moe_router_topk", 2), bool(f.get("moe_router_pre_softmax"))
    out: dict[str, Any] = {experts_key: f["num_moe_experts"], "num_experts_per_tok": topk}
    if norm_key is None:  # always renormalised (Mixtral): softmax then top-k, or top-1 pre-softmax
        if topk > 1:
            need_value(f, "moe_router_pre_softmax", (False,), arch, False)
    else:
        out[norm_key] = not pre_softmax and topk > 1
    ffn = f.get("moe_ffn_hidden_size") or f["ffn_hidden_size"]
    if ffn_key is None:
        need_value(f, "moe_ffn_hidden_size", (f["ffn_hidden_size"], None), arch, None)
    else:
        out[ffn_key] = ffn
    pattern = layer_pattern(f)
    if sparse_keys:
        out.update(decoder_sparse_step=1, mlp_only_layers=[i for i, p in enumerate(pattern) if not p])
    elif not all(pattern):
        raise UnsupportedConfigError("moe_layer_freq", f"is {f['moe_layer_freq']!r}; every {arch} layer is MoE")
    return out


def _read(k: ConfigReader) -> Fields:
    if k.get("attention_bias"):
        raise k.fail("attention_bias", "Qwen3-MoE puts it on o_proj without MLP biases, which megatron cannot express")
    layers = k.get("num_hidden_layers")
    # The window (sliding_window, nulled unless use_sliding_window) acts on every layer; max_window_layers
    # is no Qwen3MoeConfig field and Qwen3-MoE's attention never reads it (published files carry it).
    k.mark("use_sliding_window", "max_window_layers")
    fields = {**read_decoder(k, add_bias_linear=False, add_qkv_bias=False, qk_layernorm=True),
              **read_uniform_window(k, layers)}
    return read_moe(k, fields, experts_key="num_experts", alias="num_local_experts", ffn_key="moe_intermediate_size",
                    pattern=moe_pattern(k, layers))


def _write(f: Fields) -> dict[str, Any]:
    arch = QWEN3_MOE.name
    need_value(f, "add_bias_linear", (False,), arch, True)
    need_value(f, "add_qkv_bias", (False,), arch, False)
    window = uniform_window_to_hf(f, arch)
    return {**write_decoder(f, arch, qk_layernorm=True), "use_sliding_window": window is not None,
            "sliding_window": window, "head_dim": head_dim_of(f), "attention_bias": False,
            **write_moe(f, arch, experts_key="num_experts", ffn_key="moe_intermediate_size")}


def _derive(values: dict[str, Any]) -> None:
    """Qwen3MoeConfig: the window only with ``use_sliding_window``; ``num_local_experts`` spells ``num_experts``."""
    derive_experts("num_experts", "num_local_experts")(values)
    if not values["use_sliding_window"]:
        values["sliding_window"] = None
    if values["mlp_only_layers"] is None:
        values["mlp_only_layers"] = []


QWEN3_MOE = QWEN3.derive(
    name="Qwen3MoeForCausalLM", model_type="qwen3_moe", config_class="Qwen3MoeConfig", read=_read, write=_write,
    table=moe_table(QWEN3.table, expert_rules()),
    schema=ConfigSchema(
        defaults={"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 24,
                  "num_attention_heads": 32, "num_key_value_heads": 4, "hidden_act": "silu",
                  "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                  "attention_bias": False, "use_sliding_window": False, "sliding_window": 4096,
                  "decoder_sparse_step": 1, "moe_intermediate_size": 768, "num_experts_per_tok": 8,
                  "num_experts": 128, "norm_topk_prob": False, "output_router_logits": False,
                  "router_aux_loss_coef": 0.001, "mlp_only_layers": None},
        types={**MOE_TYPES, "num_key_value_heads": INT}, derive=_derive),
    expresses=WINDOW | {"num_moe_experts"})

ADAPTER = GPTAdapter(QWEN3_MOE)
