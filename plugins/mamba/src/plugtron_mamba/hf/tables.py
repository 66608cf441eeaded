"""Tensor tables: HF tensor names <-> megatron MambaModel parameter names.

Both transformers models wrap every layer as ``backbone.layers.{i}`` = a
pre-norm (``norm.weight``) plus a ``mixer`` (NemotronH keeps the ``backbone.``
prefix in its files; transformers renames it to ``model.`` in memory only).
megatron's Mamba stack fuses that norm into the layer's first projection, so
the norm weight lands on a different module per layer kind:

======  ===========================================  ==============================================
layer   HF (``backbone.layers.{i}.``)                megatron (``decoder.layers.{i}.``)
======  ===========================================  ==============================================
``M``   ``norm.weight``                              ``mixer.in_proj.layer_norm_weight``
``M``   ``mixer.{in_proj.weight, conv1d.weight,      same names under ``mixer.`` (same layouts:
        conv1d.bias, dt_bias, A_log, D,              in_proj rows ``[z|x|B|C|dt]``, conv1d
        norm.weight, out_proj.weight}``              ``[x|B|C]``, one D per head)
``*``   ``norm.weight``                              ``self_attention.linear_qkv.layer_norm_weight``
``*``   ``mixer.{q,k,v}_proj.weight``                ``self_attention.linear_qkv.weight`` (per query group)
``*``   ``mixer.o_proj.weight``                      ``self_attention.linear_proj.weight``
``-``   ``norm.weight``                              ``mlp.linear_fc1.layer_norm_weight``
``-``   ``mixer.up_proj.weight``                     ``mlp.linear_fc1.weight``
``-``   ``mixer.down_proj.weight``                   ``mlp.linear_fc2.weight``
``E``   ``norm.weight``                              ``pre_mlp_layernorm.weight``
``E``   ``mixer.gate.weight``                        ``mlp.router.weight``
``E``   ``mixer.gate.e_score_correction_bias``       ``mlp.router.expert_bias`` (float32 in both)
``E``   ``mixer.experts.{e}.up_proj.weight``         ``mlp.experts.local_experts.{e}.linear_fc1.weight``
``E``   ``mixer.experts.{e}.down_proj.weight``       ``mlp.experts.local_experts.{e}.linear_fc2.weight``
``E``   ``mixer.shared_experts.up_proj.weight``      ``mlp.shared_experts.linear_fc1.weight``
``E``   ``mixer.shared_experts.down_proj.weight``    ``mlp.shared_experts.linear_fc2.weight``
======  ===========================================  ==============================================

Routed experts are one mapping per expert (``{e}`` expanded over the
experts, global indices), as published NemotronH checkpoints store them and
transformers saves them (it stacks them into ``experts.up_proj`` in memory
only). The HF engine maps a rank's ``local_experts.{j}`` to the global
expert with its expert-parallel offset and reads only its experts' bytes.

plus ``backbone.embeddings.weight`` / ``backbone.norm_f.weight`` / ``lm_head.weight``
-> ``embedding.word_embeddings.weight`` / ``decoder.final_norm.weight`` /
``output_layer.weight`` (vocabulary rows zero-padded to megatron's size).

Every transform checks shapes and names the tensor on mismatch, so a config
that does not fit the checkpoint fails loudly instead of scrambling rows.

The tables describe whole (single-process) tensors at every tensor-parallel
size. Which rows a TP rank holds is the family builder's business
(``MambaModelBuilder.tp_row_blocks``, :mod:`plugtron_mamba.tp_layout`): the
bridge cuts chunk r of every block of ``in_proj`` and ``conv1d`` for rank r and
joins them back the same way on export (TP=2 parity and bit-exact round trips:
``tests/hf_bridge/test_hfb_multirank.py``).
"""

from __future__ import annotations

from typing import Any

#: (HF names, megatron name, kind, HF shapes in symbols of :func:`_symbols`)
Rule = tuple[tuple[str, ...], str, str, tuple[tuple[str, ...], ...]]

_MIXER = (("in_proj.weight", ("P", "H")), ("conv1d.weight", ("C", "1", "K")), ("conv1d.bias", ("C",)),
          ("dt_bias", ("NH",)), ("A_log", ("NH",)), ("D", ("NH",)), ("norm.weight", ("I",)),
          ("out_proj.weight", ("H", "I")))


def _symbols(config: Any) -> dict[str, int]:
    sizes = config.mamba_sizes()
    heads = config.num_attention_heads
    groups = config.num_query_groups or heads
    d = config.kv_channels or config.hidden_size // heads
    gn = sizes["groups"] * sizes["state"]
    return {"H": config.hidden_size, "V": config.vocab_size, "Vp": config.padded_vocab_size(), "1": 1,
            "I": sizes["inner"], "NH": sizes["heads"], "C": sizes["inner"] + 2 * gn,
            "P": 2 * sizes["inner"] + 2 * gn + sizes["heads"], "K": config.mamba_conv_kernel,
            "G": groups, "D": d, "Q": heads * d, "KV": groups * d, "F": config.ffn_hidden_size or 4 * config.hidden_size,
            "E": config.num_moe_experts or 0, "FE": config.moe_ffn_hidden_size or config.ffn_hidden_size or 0,
            "FS": config.moe_shared_expert_intermediate_size or 0}


def _layer_rules(i: int, kind: str) -> list[Rule]:
    hf, meg = f"backbone.layers.{i}.", f"decoder.layers.{i}."
    if kind == "M":
        rules: list[Rule] = [((hf + "norm.weight",), meg + "mixer.in_proj.layer_norm_weight", "copy", (("H",),))]
        return rules + [((f"{hf}mixer.{name}",), f"{meg}mixer.{name}", "copy", (shape,)) for name, shape in _MIXER]
    if kind == "*":
        qkv = tuple(f"{hf}mixer.{p}_proj.weight" for p in "qkv")
        return [((hf + "norm.weight",), meg + "self_attention.linear_qkv.layer_norm_weight", "copy", (("H",),)),
                (qkv, meg + "self_attention.linear_qkv.weight", "qkv", (("Q", "H"), ("KV", "H"), ("KV", "H"))),
                ((hf + "mixer.o_proj.weight",), meg + "self_attention.linear_proj.weight", "copy", (("H", "Q"),))]
    if kind == "-":
        return [((hf + "norm.weight",), meg + "mlp.linear_fc1.layer_norm_weight", "copy", (("H",),)),
                ((hf + "mixer.up_proj.weight",), meg + "mlp.linear_fc1.weight", "copy", (("F", "H"),)),
                ((hf + "mixer.down_proj.weight",), meg + "mlp.linear_fc2.weight", "copy", (("H", "F"),))]
    if kind == "E":
        return [((hf + "norm.weight",), meg + "pre_mlp_layernorm.weight", "copy", (("H",),))] + [
            ((hf + name,), meg + target, "copy", (shape,)) for name, target, shape in _MOE]
    raise AssertionError(f"layer symbol {kind!r} has no tensor table")


#: (HF name under ``mixer.``, megatron name under ``decoder.layers.{i}.``, HF shape) of a MoE layer.
_MOE = (("mixer.gate.weight", "mlp.router.weight", ("E", "H")),
        ("mixer.gate.e_score_correction_bias", "mlp.router.expert_bias", ("E",)),
        ("mixer.experts.{e}.up_proj.weight", "mlp.experts.local_experts.{e}.linear_fc1.weight", ("FE", "H")),
        ("mixer.experts.{e}.down_proj.weight", "mlp.experts.local_experts.{e}.linear_fc2.weight", ("H", "FE")),
        ("mixer.shared_experts.up_proj.weight", "mlp.shared_experts.linear_fc1.weight", ("FS", "H")),
        ("mixer.shared_experts.down_proj.weight", "mlp.shared_experts.linear_fc2.weight", ("H", "FS")))


def _per_expert(rules: list[Rule], experts: int) -> list[Rule]:
    """Each ``{e}`` rule once per expert, so no mapping ever holds a layer's stacked experts."""
    out: list[Rule] = []
    for hf_names, meg, kind, shapes in rules:
        if "{e}" not in meg:
            out.append((hf_names, meg, kind, shapes))
            continue
        out += [(tuple(n.format(e=e) for n in hf_names), meg.format(e=e), kind, shapes) for e in range(experts)]
    return out


def rules_for(config: Any) -> list[Rule]:
    """Global tensors first, then layer by layer (sequential reads of layer-ordered files)."""
    rules: list[Rule] = [
        (("backbone.embeddings.weight",), "embedding.word_embeddings.weight", "vocab", (("V", "H"),)),
        (("backbone.norm_f.weight",), "decoder.final_norm.weight", "copy", (("H",),)),
    ]
    if not config.share_embeddings_and_output_weights:
        rules.append((("lm_head.weight",), "output_layer.weight", "vocab", (("V", "H"),)))
    for i, kind in enumerate(config.layer_pattern()):
        rules += _per_expert(_layer_rules(i, kind), config.num_moe_experts or 0)
    return rules


def tensor_mappings(config: Any) -> list[Any]:
    """Every megatron tensor of the model and the HF tensors it is made from (``TensorMapping`` objects)."""
    from plugtron.conversion.errors import MappingError
    from plugtron.conversion.table import assert_unique, checked_mapping

    s = _symbols(config)
    if s["Vp"] < s["V"]:
        raise MappingError("word_embeddings", f"padded vocab {s['Vp']} is smaller than vocab {s['V']}")
    out = [checked_mapping(hf_names, meg_name, kind, tuple(tuple(s[x] for x in shape) for shape in shapes), s)
           for hf_names, meg_name, kind, shapes in rules_for(config)]
    assert_unique(out)
    return out
