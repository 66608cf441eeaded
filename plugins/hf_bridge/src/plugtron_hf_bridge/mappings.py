"""Declarative HF <-> megatron tensor tables and the pure-torch repacking they use.

Each architecture is described once, as data (:data:`_RULES`): which HF
tensors feed which megatron tensor, how (``kind``), under which config
condition, and the HF shapes in symbols of the config.  :func:`mapping_for`
expands the table for a concrete config into :class:`TensorMapping` objects
whose transforms check shapes and name the tensor on mismatch, so a wrong
config cannot silently produce a scrambled checkpoint.

Layout facts encoded here:

- megatron ``linear_qkv`` rows are grouped per query group:
  ``[q heads of g; k of g; v of g]`` for g in groups; HF keeps q/k/v apart.
- megatron ``linear_fc1`` of a gated MLP is ``[gate; up]``.
- GPT-2's ``Conv1D`` stores weights as ``[in, out]`` (transposed vs ``nn.Linear``)
  and ``c_attn`` is ``[q | k | v]`` along the output dim.
- megatron pads the vocabulary; padding rows are zeros on import and dropped on export.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

from .errors import MappingError
from .hf_config import GPT2, LLAMA, MISTRAL, QWEN2, QWEN3, SUPPORTED_ARCHITECTURES
from .pieces import Piece, pieces_for

if TYPE_CHECKING:  # the tables are built without torch: a launcher validates a checkpoint before any rank imports it
    from torch import Tensor


# ---------------------------------------------------------------- pure repacking functions
def pack_qkv(q: Tensor, k: Tensor, v: Tensor, num_query_groups: int, head_dim: int, name: str = "linear_qkv") -> Tensor:
    """Interleave separate q/k/v (weights ``[rows, hidden]`` or biases ``[rows]``) per query group."""
    import torch

    g, d = num_query_groups, head_dim
    if q.shape[0] % (g * d) or k.shape[0] != g * d or v.shape[0] != g * d or not q.shape[1:] == k.shape[1:] == v.shape[1:]:
        raise MappingError(name, f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit {g} groups of head_dim {d}")
    rest = q.shape[1:]
    parts = [q.reshape(g, -1, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def unpack_qkv(qkv: Tensor, num_query_groups: int, head_dim: int, name: str = "linear_qkv") -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`pack_qkv`: split a megatron ``linear_qkv`` weight or bias into q, k, v."""
    g, d = num_query_groups, head_dim
    rows, rest = qkv.shape[0], qkv.shape[1:]
    if rows % (g * d) or rows // (g * d) < 3:
        raise MappingError(name, f"{rows} rows cannot hold {g} groups of (>=1 q + k + v) heads of size {d}")
    q_rows = (rows // (g * d) - 2) * d
    grouped = qkv.reshape(g, rows // g, *rest)
    q = grouped[:, :q_rows].reshape(-1, *rest).contiguous()
    k = grouped[:, q_rows:q_rows + d].reshape(-1, *rest).contiguous()
    v = grouped[:, q_rows + d:].reshape(-1, *rest).contiguous()
    return q, k, v


def pack_gate_up(gate: Tensor, up: Tensor, name: str = "linear_fc1") -> Tensor:
    """megatron's gated ``linear_fc1`` is ``[gate; up]`` along the output rows."""
    import torch

    if gate.shape != up.shape:
        raise MappingError(name, f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    return torch.cat([gate, up], dim=0)


def unpack_gate_up(fc1: Tensor, name: str = "linear_fc1") -> tuple[Tensor, Tensor]:
    if fc1.shape[0] % 2:
        raise MappingError(name, f"{fc1.shape[0]} rows cannot be split into equal gate and up halves")
    gate, up = fc1.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()


def conv1d_to_linear(weight: Tensor) -> Tensor:
    """GPT-2 ``Conv1D`` weights are ``[in, out]``; ``nn.Linear``/megatron use ``[out, in]`` (self-inverse)."""
    return weight.t().contiguous()


linear_to_conv1d = conv1d_to_linear


def gpt2_c_attn_to_qkv(c_attn: Tensor, num_heads: int, head_dim: int) -> Tensor:
    """GPT-2 ``c_attn`` (Conv1D weight ``[H, 3H]`` or bias ``[3H]``) -> megatron ``linear_qkv``."""
    rows = conv1d_to_linear(c_attn) if c_attn.dim() == 2 else c_attn
    if rows.shape[0] % 3:
        raise MappingError("c_attn", f"shape {tuple(c_attn.shape)} is not [q|k|v] concatenated")
    q, k, v = rows.chunk(3, dim=0)
    return pack_qkv(q, k, v, num_heads, head_dim)  # multi-head attention: one group per head


def qkv_to_gpt2_c_attn(qkv: Tensor, num_heads: int, head_dim: int) -> Tensor:
    import torch

    rows = torch.cat(unpack_qkv(qkv, num_heads, head_dim), dim=0)
    return linear_to_conv1d(rows) if rows.dim() == 2 else rows


def pad_vocab(weight: Tensor, padded_size: int) -> Tensor:
    import torch

    if weight.shape[0] > padded_size:
        raise MappingError("word_embeddings", f"{weight.shape[0]} vocab rows exceed the padded size {padded_size}")
    return torch.cat([weight, weight.new_zeros(padded_size - weight.shape[0], *weight.shape[1:])], dim=0)


def unpad_vocab(weight: Tensor, vocab_size: int) -> Tensor:
    return weight[:vocab_size].contiguous()


# ---------------------------------------------------------------- declarative tables
@dataclass(frozen=True)
class _Rule:
    hf: tuple[str, ...]  # names; "{i}" is the layer index
    megatron: str  # "{in_w}" etc. are resolved by the norm naming scheme
    kind: str  # copy | vocab | qkv | gate_up | conv1d | c_attn
    shapes: tuple[tuple[str, ...], ...]  # HF shapes in config symbols, see _symbols
    when: str | None = None  # condition name, see _conditions


def _layer(prefix: str, rules: Sequence[tuple[Any, ...]]) -> list[_Rule]:
    return [_Rule(tuple(prefix + h for h in hf), "decoder.layers.{i}." + m, *rest) for hf, m, *rest in rules]


_LLAMA_LIKE_RULES = [
    _Rule(("model.embed_tokens.weight",), "embedding.word_embeddings.weight", "vocab", (("V", "H"),)),
    _Rule(("model.norm.weight",), "decoder.final_layernorm.weight", "copy", (("H",),)),
    _Rule(("lm_head.weight",), "output_layer.weight", "vocab", (("V", "H"),), "untied"),
] + _layer("model.layers.{i}.", [
    (("input_layernorm.weight",), "{in_w}", "copy", (("H",),)),
    (("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
     "self_attention.linear_qkv.weight", "qkv", (("Q", "H"), ("KV", "H"), ("KV", "H"))),
    (("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
     "self_attention.linear_qkv.bias", "qkv", (("Q",), ("KV",), ("KV",)), "qkv_bias"),
    (("self_attn.q_norm.weight",), "self_attention.q_layernorm.weight", "copy", (("D",),), "qk_norm"),
    (("self_attn.k_norm.weight",), "self_attention.k_layernorm.weight", "copy", (("D",),), "qk_norm"),
    (("self_attn.o_proj.weight",), "self_attention.linear_proj.weight", "copy", (("H", "Q"),)),
    (("self_attn.o_proj.bias",), "self_attention.linear_proj.bias", "copy", (("H",),), "linear_bias"),
    (("post_attention_layernorm.weight",), "{mlp_w}", "copy", (("H",),)),
    (("mlp.gate_proj.weight", "mlp.up_proj.weight"), "mlp.linear_fc1.weight", "gate_up", (("F", "H"), ("F", "H"))),
    (("mlp.gate_proj.bias", "mlp.up_proj.bias"), "mlp.linear_fc1.bias", "gate_up", (("F",), ("F",)), "linear_bias"),
    (("mlp.down_proj.weight",), "mlp.linear_fc2.weight", "copy", (("H", "F"),)),
    (("mlp.down_proj.bias",), "mlp.linear_fc2.bias", "copy", (("H",),), "linear_bias"),
])

_GPT2_RULES = [
    _Rule(("transformer.wte.weight",), "embedding.word_embeddings.weight", "vocab", (("V", "H"),)),
    _Rule(("transformer.wpe.weight",), "embedding.position_embeddings.weight", "copy", (("P", "H"),)),
    _Rule(("transformer.ln_f.weight",), "decoder.final_layernorm.weight", "copy", (("H",),)),
    _Rule(("transformer.ln_f.bias",), "decoder.final_layernorm.bias", "copy", (("H",),)),
    _Rule(("lm_head.weight",), "output_layer.weight", "vocab", (("V", "H"),), "untied"),
] + _layer("transformer.h.{i}.", [
    (("ln_1.weight",), "{in_w}", "copy", (("H",),)),
    (("ln_1.bias",), "{in_b}", "copy", (("H",),)),
    (("attn.c_attn.weight",), "self_attention.linear_qkv.weight", "c_attn", (("H", "Q3"),)),
    (("attn.c_attn.bias",), "self_attention.linear_qkv.bias", "c_attn", (("Q3",),)),
    (("attn.c_proj.weight",), "self_attention.linear_proj.weight", "conv1d", (("H", "H"),)),
    (("attn.c_proj.bias",), "self_attention.linear_proj.bias", "copy", (("H",),)),
    (("ln_2.weight",), "{mlp_w}", "copy", (("H",),)),
    (("ln_2.bias",), "{mlp_b}", "copy", (("H",),)),
    (("mlp.c_fc.weight",), "mlp.linear_fc1.weight", "conv1d", (("H", "F"),)),
    (("mlp.c_fc.bias",), "mlp.linear_fc1.bias", "copy", (("F",),)),
    (("mlp.c_proj.weight",), "mlp.linear_fc2.weight", "conv1d", (("F", "H"),)),
    (("mlp.c_proj.bias",), "mlp.linear_fc2.bias", "copy", (("H",),)),
])

_RULES: dict[str, list[_Rule]] = {LLAMA: _LLAMA_LIKE_RULES, MISTRAL: _LLAMA_LIKE_RULES, QWEN2: _LLAMA_LIKE_RULES,
                                  QWEN3: _LLAMA_LIKE_RULES, GPT2: _GPT2_RULES}

_NORM_NAMES = {  # local spec vs transformer-engine fused spec
    False: {"in_w": "input_layernorm.weight", "in_b": "input_layernorm.bias",
            "mlp_w": "pre_mlp_layernorm.weight", "mlp_b": "pre_mlp_layernorm.bias"},
    True: {"in_w": "self_attention.linear_qkv.layer_norm_weight", "in_b": "self_attention.linear_qkv.layer_norm_bias",
           "mlp_w": "mlp.linear_fc1.layer_norm_weight", "mlp_b": "mlp.linear_fc1.layer_norm_bias"},
}

#: Tensors old or full HF checkpoints may contain that carry no parameters (recomputed buffers).
_BUFFER_SUFFIXES = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


@dataclass(frozen=True)
class TensorMapping:
    """How one megatron tensor is built from (and split back into) HF tensors.

    ``to_megatron`` takes the HF tensors in ``hf_names`` order; ``to_hf`` returns
    them in that order.  Both check shapes and raise :class:`MappingError`.
    """

    hf_names: tuple[str, ...]
    megatron_name: str
    to_megatron: Callable[[list[Tensor]], Tensor]
    to_hf: Callable[[Tensor], list[Tensor]]
    hf_shapes: tuple[tuple[int, ...], ...]
    megatron_shape: tuple[int, ...]
    #: Row layout for reading tensor-parallel shards directly (see :mod:`.pieces`);
    #: ``None`` makes the importer build the full tensor and slice it.
    pieces: tuple[Piece, ...] | None = None


def _symbols(f: dict[str, Any], padded_vocab: int) -> dict[str, int]:
    heads, hidden = f["num_attention_heads"], f["hidden_size"]
    d = f.get("kv_channels") or hidden // heads
    groups = f.get("num_query_groups") or heads
    return {"H": hidden, "V": f["vocab_size"], "Vp": padded_vocab, "D": d, "Q": heads * d, "KV": groups * d,
            "Q3": 3 * heads * d, "F": f["ffn_hidden_size"], "P": f.get("seq_length", 0), "G": groups, "NH": heads}


def _conditions(f: dict[str, Any]) -> dict[str, bool]:
    bias = bool(f.get("add_bias_linear", True))
    return {"untied": not f.get("share_embeddings_and_output_weights", True), "linear_bias": bias,
            "qkv_bias": bias or bool(f.get("add_qkv_bias", False)), "qk_norm": bool(f.get("qk_layernorm", False))}


def _transforms(kind: str, s: dict[str, int], meg_name: str) -> tuple[Callable[[list[Tensor]], Tensor], Callable[[Tensor], list[Tensor]]]:
    g, d = s["G"], s["D"]
    if kind == "copy":
        return (lambda ts: ts[0]), (lambda t: [t])
    if kind == "vocab":
        return (lambda ts: pad_vocab(ts[0], s["Vp"])), (lambda t: [unpad_vocab(t, s["V"])])
    if kind == "qkv":
        return (lambda ts: pack_qkv(*ts, g, d, meg_name)), (lambda t: list(unpack_qkv(t, g, d, meg_name)))
    if kind == "gate_up":
        return (lambda ts: pack_gate_up(*ts, meg_name)), (lambda t: list(unpack_gate_up(t, meg_name)))
    if kind == "conv1d":
        return (lambda ts: conv1d_to_linear(ts[0])), (lambda t: [linear_to_conv1d(t)])
    if kind == "c_attn":
        return (lambda ts: gpt2_c_attn_to_qkv(ts[0], s["NH"], d)), (lambda t: [qkv_to_gpt2_c_attn(t, s["NH"], d)])
    raise AssertionError(f"unknown mapping kind {kind!r}")


def megatron_shape(kind: str, hf_shapes: tuple[tuple[int, ...], ...], sym: dict[str, int], name: str) -> tuple[int, ...]:
    """The megatron tensor's shape for HF tensors of ``hf_shapes``, by the rules of :func:`_transforms`.

    Worked out from the shapes instead of running the transform on meta
    tensors, so building a table needs no torch. The one layout the packing
    would refuse (query heads not a multiple of the groups) is refused here
    alike; ``test_hfb_mappings`` checks every kind against the real transforms.
    """
    first = hf_shapes[0]
    if kind == "vocab":
        return (sym["Vp"], *first[1:])
    if kind in ("qkv", "c_attn"):
        groups = sym["G"] if kind == "qkv" else sym["NH"]
        if sym["NH"] % groups:
            raise MappingError(name, f"{sym['NH']} query heads cannot be split into {groups} groups")
        if kind == "c_attn":
            return first[::-1]
        return (sum(shape[0] for shape in hf_shapes), *first[1:])
    if kind == "gate_up":
        return (2 * first[0], *first[1:])
    if kind == "conv1d":
        return first[::-1]
    return first


def _checked(hf_names: tuple[str, ...], meg_name: str, hf_shapes: tuple[tuple[int, ...], ...],
             fwd: Callable[[list[Tensor]], Tensor], bwd: Callable[[Tensor], list[Tensor]],
             kind: str, sym: dict[str, int]) -> TensorMapping:
    def check(name: str, t: Tensor, shape: tuple[int, ...]) -> None:
        if tuple(t.shape) != shape:
            raise MappingError(name, f"has shape {tuple(t.shape)}, the config implies {shape}")

    def to_megatron(ts: list[Tensor]) -> Tensor:
        if len(ts) != len(hf_names):
            raise MappingError(meg_name, f"needs {len(hf_names)} HF tensors {hf_names}, got {len(ts)}")
        for n, t, shape in zip(hf_names, ts, hf_shapes):
            check(n, t, shape)
        return fwd(list(ts))

    meg_shape = megatron_shape(kind, hf_shapes, sym, meg_name)

    def to_hf(t: Tensor) -> list[Tensor]:
        check(meg_name, t, meg_shape)
        return bwd(t)

    return TensorMapping(hf_names, meg_name, to_megatron, to_hf, hf_shapes, meg_shape)


def mapping_for(architecture: str, fields: dict[str, Any], te_fused_norms: bool = False,
                padded_vocab_size: int | None = None) -> list[TensorMapping]:
    """All tensor mappings for a model, per-layer entries expanded over ``num_layers``.

    ``fields`` are megatron config fields (see :func:`hf_config.to_megatron_fields`).
    ``padded_vocab_size`` defaults to the unpadded vocabulary (no padding).
    """
    if architecture not in _RULES:
        raise MappingError(architecture, f"no tensor table; supported: {SUPPORTED_ARCHITECTURES}")
    for key in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "ffn_hidden_size"):
        if fields.get(key) is None:
            raise MappingError(architecture, f"config field '{key}' is required to build the tensor table")
    sym = _symbols(fields, padded_vocab_size or fields["vocab_size"])
    if sym["Vp"] < sym["V"]:
        raise MappingError("word_embeddings", f"padded_vocab_size {sym['Vp']} is smaller than vocab_size {sym['V']}")
    cond, norms = _conditions(fields), _NORM_NAMES[bool(te_fused_norms)]
    rules = [r for r in _RULES[architecture] if r.when is None or cond[r.when]]
    # Global tensors first, then layer by layer: sequential reads of layer-ordered shards.
    jobs = [(r, None) for r in rules if "{i}" not in r.megatron]
    jobs += [(r, i) for i in range(fields["num_layers"]) for r in rules if "{i}" in r.megatron]
    out: list[TensorMapping] = []
    for rule, i in jobs:
        shapes = tuple(tuple(sym[x] for x in shape) for shape in rule.shapes)
        meg = rule.megatron.format(i=i, **norms)
        fwd, bwd = _transforms(rule.kind, sym, meg)
        names = tuple(n.format(i=i) for n in rule.hf)
        mapping = _checked(names, meg, shapes, fwd, bwd, rule.kind, sym)
        out.append(dataclasses.replace(mapping, pieces=pieces_for(rule.kind, names, shapes, sym)))
    _assert_unique(out)
    return out


def _assert_unique(mappings: list[TensorMapping]) -> None:
    seen: set[str] = set()
    for name in [n for m in mappings for n in m.hf_names] + [m.megatron_name for m in mappings]:
        if name in seen:
            raise AssertionError(f"tensor table uses '{name}' twice")
        seen.add(name)


def expected_hf_names(architecture: str, fields: dict[str, Any], te_fused_norms: bool = False) -> list[str]:
    """Every HF tensor name a checkpoint of this config must contain, each used exactly once."""
    return [n for m in mapping_for(architecture, fields, te_fused_norms) for n in m.hf_names]


def check_hf_names(mappings: Sequence[TensorMapping], available: Iterable[str], fields: dict[str, Any]) -> list[str]:
    """Strictly compare checkpoint names with the table; return the names tolerated but unused.

    Tolerated: ``lm_head.weight`` when embeddings are tied (full state dicts keep
    it) and parameter-free buffers old checkpoints saved.  Anything else extra or
    missing raises :class:`MappingError` naming it.
    """
    needed = {n for m in mappings for n in m.hf_names}
    available = set(available)
    missing = sorted(needed - available)
    if missing:
        raise MappingError(missing[0], f"missing from the checkpoint ({len(missing)} missing in all)")
    skipped = []
    for name in sorted(available - needed):
        tied = name == "lm_head.weight" and fields.get("share_embeddings_and_output_weights", True)
        if not (tied or name.endswith(_BUFFER_SUFFIXES)):
            raise MappingError(name, "present in the checkpoint but not used by the conversion table")
        skipped.append(name)
    return skipped


def hf_to_megatron(mappings: Iterable[TensorMapping], read: Callable[[str], Tensor]) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(megatron_name, tensor)`` one at a time, reading HF tensors through ``read``."""
    for m in mappings:
        yield m.megatron_name, m.to_megatron([read(n) for n in m.hf_names])


def megatron_to_hf(mappings: Iterable[TensorMapping], read: Callable[[str], Tensor]) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(hf_name, tensor)`` pairs, reading megatron tensors through ``read``."""
    for m in mappings:
        yield from zip(m.hf_names, m.to_hf(read(m.megatron_name)))
