"""The core's conversion vocabulary (:mod:`plugtron.conversion`): repacking, table kinds, row layouts, table edits.

Architecture-independent: every kind is exercised on small made-up shapes here;
the GPT architectures' tables built from these kinds are tested in
``tests/hf_bridge/test_hfb_mappings.py`` and ``test_hfb_pieces.py``.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from plugtron.conversion import (
    MappingError,
    Rule,
    Table,
    direct,
    expand,
    fused_gate_up,
    fused_qkv,
    gated_fc1,
    grouped_qkv,
    layer,
    table,
    transposed,
    transposed_qkv,
    vocab_rows,
)
from plugtron.conversion.packing import (
    grouped_qkv_to_transposed,
    pack_gate_up,
    pack_qkv,
    pad_vocab,
    split_fused_qkv,
    transpose,
    transposed_qkv_to_grouped,
    unpack_gate_up,
    unpack_qkv,
    unpad_vocab,
)
from plugtron.conversion.pieces import rows_from_pieces
from plugtron.conversion.table import assert_unique, checked_mapping, hf_to_megatron, megatron_to_hf

# -- the repacking functions ------------------------------------------------------------------------------------------


def reference_pack(q, k, v, groups, d):
    """Row-by-row construction of megatron's layout, independent of pack_qkv's reshapes."""
    per_group = q.shape[0] // (groups * d)
    rows = []
    for g in range(groups):
        for h in range(per_group):
            rows += [q[(g * per_group + h) * d + i] for i in range(d)]
        rows += [k[g * d + i] for i in range(d)]
        rows += [v[g * d + i] for i in range(d)]
    return torch.stack(rows)


@settings(max_examples=40, deadline=None, database=None)
@given(groups=st.integers(1, 4), per_group=st.integers(1, 4), d=st.integers(1, 5), hidden=st.integers(1, 6),
       bias=st.booleans())
def test_pack_qkv_layout_and_inverse(groups: int, per_group: int, d: int, hidden: int, bias: bool) -> None:
    shape = (lambda rows: (rows,)) if bias else (lambda rows: (rows, hidden))
    q = torch.randn(shape(groups * per_group * d))
    k, v = torch.randn(shape(groups * d)), torch.randn(shape(groups * d))
    packed = pack_qkv(q, k, v, groups, d)
    assert torch.equal(packed, reference_pack(q, k, v, groups, d))
    for got, want in zip(unpack_qkv(packed, groups, d), (q, k, v)):
        assert torch.equal(got, want) and got.is_contiguous()


def test_gate_up_and_transposed_qkv_semantics() -> None:
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    fc1 = pack_gate_up(gate, up)
    assert torch.equal(fc1[:6], gate) and torch.equal(fc1[6:], up)
    assert all(torch.equal(a, b) for a, b in zip(unpack_gate_up(fc1), (gate, up)))
    heads, d = 3, 2
    hidden = heads * d
    c_attn = torch.randn(hidden, 3 * hidden)  # Conv1D: [in, out], out = [q | k | v]
    qkv = transposed_qkv_to_grouped(c_attn, heads, d)
    for h in range(heads):  # megatron: per head, [q_h; k_h; v_h] rows = Linear weights = Conv1D columns
        block = qkv[h * 3 * d:(h + 1) * 3 * d]
        for j, part in enumerate(range(3)):
            cols = c_attn[:, part * hidden + h * d: part * hidden + (h + 1) * d]
            assert torch.equal(block[j * d:(j + 1) * d], cols.t())
    assert torch.equal(grouped_qkv_to_transposed(qkv, heads, d), c_attn)
    bias = torch.randn(3 * hidden)
    assert torch.equal(grouped_qkv_to_transposed(transposed_qkv_to_grouped(bias, heads, d), heads, d), bias)
    weight = torch.randn(5, 3)
    assert torch.equal(transpose(weight), weight.t()) and torch.equal(transpose(transpose(weight)), weight)
    assert transpose(weight).is_contiguous()


def test_a_fused_qkv_is_cut_into_q_k_v() -> None:
    q, k, v = torch.randn(8, 3), torch.randn(4, 3), torch.randn(4, 3)
    got = split_fused_qkv(torch.cat([q, k, v]), 8, 4)
    assert all(torch.equal(a, b) for a, b in zip(got, (q, k, v)))
    with pytest.raises(MappingError, match="model.qkv_proj.weight"):
        split_fused_qkv(torch.randn(15, 3), 8, 4, "model.qkv_proj.weight")


def test_vocab_padding_and_refusals_name_the_tensor() -> None:
    emb = torch.randn(5, 3)
    padded = pad_vocab(emb, 8)
    assert padded.shape == (8, 3) and torch.equal(padded[:5], emb) and not padded[5:].any()
    assert torch.equal(unpad_vocab(padded, 5), emb)
    with pytest.raises(MappingError, match="word_embeddings"):
        pad_vocab(emb, 4)
    with pytest.raises(MappingError, match="linear_fc1"):
        unpack_gate_up(torch.randn(5, 2))
    with pytest.raises(MappingError, match="layer.qkv"):
        pack_qkv(torch.randn(8, 2), torch.randn(3, 2), torch.randn(4, 2), 2, 2, "layer.qkv")
    with pytest.raises(MappingError, match="linear_qkv"):
        unpack_qkv(torch.randn(8, 2), 2, 2)  # 2 rows per group cannot hold q, k and v


# -- every kind: shapes worked out without torch equal the transforms', row layouts equal the tensors ---------------
#: Symbols of a small grouped-query model (4 heads of 2 in 2 groups) and its GPT-2-like twin (one group per head).
SYM = {"H": 8, "V": 7, "Vp": 8, "D": 2, "NH": 4, "G": 2, "Q": 8, "KV": 4, "Q3": 24, "F": 5, "P": 6}

EVERY_KIND = table(
    vocab_rows("embed.weight", "embedding.word_embeddings.weight"),
    direct("pos.weight", "embedding.position_embeddings.weight", ("P", "H")),
    layer("layers.{i}.", [
        direct("norm.weight", "{norm}", ("H",)),
        grouped_qkv("q.weight", "k.weight", "v.weight", "self_attention.linear_qkv.weight", ("Q", "H"), ("KV", "H")),
        grouped_qkv("q.bias", "k.bias", "v.bias", "self_attention.linear_qkv.bias", ("Q",), ("KV",)),
        fused_qkv("qkv.weight", "fused_attention.linear_qkv.weight", (16, "H")),  # Q + 2 * KV rows
        fused_qkv("qkv.bias", "fused_attention.linear_qkv.bias", (16,)),
        gated_fc1("gate.weight", "up.weight", "mlp.linear_fc1.weight", ("F", "H")),
        fused_gate_up("gate_up.weight", "fused_mlp.linear_fc1.weight", (10, "H")),
        transposed("c_fc.weight", "conv_mlp.linear_fc1.weight", ("H", "F")),
        direct("down.weight", "mlp.linear_fc2.weight", ("H", "F")),
    ]),
)
GPT2_LIKE = table(layer("h.{i}.", [
    transposed_qkv("c_attn.weight", "self_attention.linear_qkv.weight", ("H", "Q3")),
    transposed_qkv("c_attn.bias", "self_attention.linear_qkv.bias", ("Q3",)),
]))
SYM_MHA = {**SYM, "G": 4, "KV": 8}


def _random(mapping, gen):
    return {n: torch.randn(s, generator=gen) for n, s in zip(mapping.hf_names, mapping.hf_shapes)}


def _assemble(mapping, tensors, start, stop):
    return rows_from_pieces(mapping.pieces, mapping.megatron_shape, tensors, start, stop)


@pytest.mark.parametrize("rules,sym", [(EVERY_KIND, SYM), (GPT2_LIKE, SYM_MHA)], ids=["grouped", "transposed"])
def test_every_kind_shapes_round_trip_and_row_layout(rules: Table, sym: dict) -> None:
    """``megatron_shape`` (no torch) equals what the transform produces, to_hf inverts to_megatron bit for bit,
    and the pieces of every row range assemble to those rows of the full tensor."""
    gen = torch.Generator().manual_seed(0)
    mappings = expand(rules, {}, sym, num_layers=2, names={"norm": "input_layernorm.weight"})
    kinds = {r.kind for r in rules}
    assert kinds == ({"vocab", "copy", "qkv", "fused_qkv", "gate_up", "transposed"} if rules is EVERY_KIND
                     else {"transposed_qkv"})
    for mapping in mappings:
        tensors = _random(mapping, gen)
        full = mapping.to_megatron([tensors[n] for n in mapping.hf_names])
        assert tuple(full.shape) == mapping.megatron_shape, mapping.megatron_name
        back = mapping.to_hf(full)
        assert all(torch.equal(a, tensors[n]) for a, n in zip(back, mapping.hf_names)), mapping.megatron_name
        assert mapping.pieces is not None, mapping.megatron_name
        rows = full.shape[0]
        for start, stop in {r for i in range(rows) for r in ((i, i + 1), (0, i + 1), (i, rows))}:  # every boundary
            assert torch.equal(_assemble(mapping, tensors, start, stop), full[start:stop]), \
                (mapping.megatron_name, start, stop)


def test_a_fused_qkv_is_grouped_like_separate_q_k_v() -> None:
    gen = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(8, 8, generator=gen), torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    separate = checked_mapping(("q", "k", "v"), "qkv", "qkv", ((8, 8), (4, 8), (4, 8)), SYM)
    fused = checked_mapping(("qkv",), "qkv", "fused_qkv", ((16, 8),), SYM)
    assert torch.equal(fused.to_megatron([torch.cat([q, k, v])]), separate.to_megatron([q, k, v]))
    assert torch.equal(fused.to_hf(separate.to_megatron([q, k, v]))[0], torch.cat([q, k, v]))


@pytest.mark.parametrize("kind,shapes", [("qkv", ((6, 8), (4, 8), (4, 8))), ("fused_qkv", ((14, 8),))])
def test_heads_that_do_not_split_into_groups_are_refused_when_the_table_is_built(kind: str, shapes) -> None:
    sym = {**SYM, "NH": 3, "Q": 6}  # 3 heads, 2 groups
    with pytest.raises(MappingError, match="3 query heads cannot be split into 2 groups"):
        checked_mapping(tuple(f"t{i}" for i in range(len(shapes))), "linear_qkv", kind, shapes, sym)


def test_mappings_check_shapes_and_counts_naming_the_tensor() -> None:
    mapping = checked_mapping(("gate", "up"), "linear_fc1", "gate_up", ((5, 8), (5, 8)), SYM)
    with pytest.raises(MappingError, match="'up'"):
        mapping.to_megatron([torch.zeros(5, 8), torch.zeros(4, 8)])
    with pytest.raises(MappingError, match="needs 2 source tensors"):
        mapping.to_megatron([torch.zeros(5, 8)])
    with pytest.raises(MappingError, match="'linear_fc1'"):
        mapping.to_hf(torch.zeros(9, 8))


# -- tables: conditions, expansion order, edits ------------------------------------------------------------------------
def test_rule_conditions() -> None:
    rule = direct("a", "b", ("H",))
    assert rule.holds({})
    assert direct("a", "b", ("H",), when="x").holds({"x": 1}) and not direct("a", "b", ("H",), when="x").holds({})
    assert direct("a", "b", ("H",), when="not x").holds({}) and not direct("a", "b", ("H",), when="not x").holds({"x": True})
    either = direct("a", "b", ("H",), when=("x", "y"))
    assert either.holds({"y": True}) and either.holds({"x": True}) and not either.holds({"x": False, "y": 0})


def test_expand_order_names_and_conditions() -> None:
    rules = table(
        layer("l.{i}.", [direct("w", "w", ("H",)), direct("b", "b", ("H",), when="bias")], megatron_prefix="m.{i}."),
        direct("norm", "final", ("H",)),
        vocab_rows("head", "output", when="not tied"),
    )
    plain = expand(rules, {"tied": True}, SYM, 2)
    assert [m.megatron_name for m in plain] == ["final", "m.0.w", "m.1.w"]  # globals first, then layer by layer
    full = expand(rules, {"bias": True}, SYM, 2)
    assert [m.megatron_name for m in full] == ["final", "output", "m.0.w", "m.0.b", "m.1.w", "m.1.b"]
    assert [m.hf_names for m in full][2:4] == [("l.0.w",), ("l.0.b",)]
    assert full[1].megatron_shape == (SYM["Vp"], SYM["H"])
    with pytest.raises(MappingError, match="word_embeddings"):
        expand(rules, {}, {**SYM, "Vp": 6}, 2)


def test_a_name_used_twice_is_a_bug_in_the_table() -> None:
    rules = table(direct("a", "x", ("H",)), direct("a", "y", ("H",)))
    with pytest.raises(AssertionError, match="'a' twice"):
        expand(rules, {}, SYM, 1)
    with pytest.raises(AssertionError, match="'x' twice"):
        assert_unique(expand(table(direct("a", "x", ("H",)), direct("b", "x", ("H",))), {}, SYM, 1))
    with pytest.raises(AssertionError, match="'x' twice"):
        expand(table(direct("a", "x", ("H",)), direct("b", "x", ("H",))), {}, SYM, 1)


def test_table_edits_derive_variants() -> None:
    base = table(layer("model.layers.{i}.", [direct("self_attn.o_proj.weight", "proj", ("H", "Q")),
                                             direct("mlp.down_proj.weight", "fc2", ("H", "F"))]))
    renamed = base.renamed({"model.layers": "transformer.h", "self_attn": "attn"})
    assert [r.hf for r in renamed] == [("transformer.h.{i}.attn.o_proj.weight",), ("transformer.h.{i}.mlp.down_proj.weight",)]
    assert [r.megatron for r in renamed] == [r.megatron for r in base]
    less = base.without("decoder.layers.{i}.fc2")
    assert [r.megatron for r in less] == ["decoder.layers.{i}.proj"]
    with pytest.raises(KeyError, match="nope"):
        base.without("nope")
    conditional = base.when("decoder.layers.{i}.fc2", "gated")
    assert [r.when for r in conditional] == [None, "gated"] and [r.when for r in base] == [None, None]
    with pytest.raises(KeyError):
        base.replace("nope", lambda r: r)
    extended = base + [direct("model.norm.weight", "final", ("H",))]
    assert isinstance(extended, Table) and len(extended.rules) == 3 and isinstance(extended.rules[-1], Rule)
    names = [m.megatron_name for m in expand(conditional, {}, SYM, 1)]
    assert names == ["decoder.layers.0.proj"]


def test_round_trip_helpers_stream_tensor_by_tensor() -> None:
    mappings = expand(table(gated_fc1("g", "u", "fc1", ("F", "H")), direct("d", "fc2", ("H", "F"))), {}, SYM, 1)
    gen = torch.Generator().manual_seed(2)
    source = {n: torch.randn(s, generator=gen) for m in mappings for n, s in zip(m.hf_names, m.hf_shapes)}
    meg = dict(hf_to_megatron(mappings, source.__getitem__))
    assert list(meg) == ["fc1", "fc2"] and torch.equal(meg["fc1"], torch.cat([source["g"], source["u"]]))
    back = dict(megatron_to_hf(mappings, meg.__getitem__))
    assert list(back) == ["g", "u", "d"] and all(torch.equal(back[n], source[n]) for n in source)


def test_the_vocabulary_and_tables_need_no_torch() -> None:
    """A launcher builds tables and reads configs before any rank imports torch."""
    script = ("import sys\n"
              "from plugtron.conversion import table, layer, grouped_qkv, fused_qkv, vocab_rows, transposed_qkv, expand\n"
              "sym = {'H': 8, 'V': 7, 'Vp': 8, 'D': 2, 'NH': 4, 'G': 2, 'Q': 8, 'KV': 4, 'Q3': 24}\n"
              "rules = table(vocab_rows('e', 'emb'), layer('l.{i}.', [grouped_qkv('q', 'k', 'v', 'qkv', ('Q', 'H'), ('KV', 'H')),"
              " fused_qkv('f', 'fqkv', (16, 'H')), transposed_qkv('c', 'cqkv', ('H', 'Q3'))]))\n"
              "assert len(expand(rules, {}, sym, 2)) == 7\n"
              "print('torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"
