"""Tensor tables: which source tensors make which megatron tensor, and how.

An architecture describes its weights once, as data: a :class:`Table` of
:class:`Rule` objects written with the constructors below (the public
vocabulary), shapes given in symbols of the config (``("Q", "H")``). The
table describes *whole* tensors; which rows a tensor-parallel rank holds is
the family builder's knowledge (megatron's partition attributes and
``tp_row_blocks``), so one table serves every layout. :func:`expand` turns a
table and a concrete config into :class:`TensorMapping` objects whose
transforms check shapes and name the tensor on mismatch: a config that does
not fit the checkpoint fails loudly instead of scrambling rows.

Kinds (``Rule.kind``) and their constructors:

==================  ======================  ================================================
constructor         kind                    megatron tensor from source tensors
==================  ======================  ================================================
``direct``          ``copy``                the same tensor
``fused_gate_up``   ``copy``                a stored ``[gate; up]`` (megatron's own layout)
``vocab_rows``      ``vocab``               rows zero-padded to megatron's padded vocabulary
``grouped_qkv``     ``qkv``                 separate q, k, v interleaved per query group
``fused_qkv``       ``fused_qkv``           one stored ``[q; k; v]``, interleaved per group
``gated_fc1``       ``gate_up``             separate gate and up stacked ``[gate; up]``
``transposed``      ``transposed``          a ``Conv1D`` ``[in, out]`` weight transposed
``transposed_qkv``  ``transposed_qkv``      a ``Conv1D`` ``[q | k | v]`` (GPT-2 ``c_attn``)
==================  ======================  ================================================

Symbols the kinds rely on: ``V`` / ``Vp`` (vocabulary, padded), ``G`` (query
groups), ``D`` (head dim), ``NH`` (query heads), ``Q`` (``NH * D``), ``KV``
(``G * D``). A family computes the symbol dict from its config.

Names are ``str.format`` templates: ``{i}`` is the layer index (a rule with
``{i}`` in its megatron name is expanded over the layers), ``{e}`` the expert
index (expanded over ``sym["E"]`` experts: one mapping per expert, so no
tensor ever stacks a layer's experts), other fields are filled from the
``names`` given to :func:`expand` (e.g. the norm names that differ between
layer specs). A rule limited to a layer kind (``Rule.layers``, e.g.
``"moe"`` or ``"dense"``, see :func:`for_layers`) is expanded only over the
layers of that kind.

Multi-token prediction (MTP) layers: a rule with ``{m}`` in its megatron name
(``mtp.layers.{m}.``) is expanded over ``sym["MTP"]`` MTP layers (none when the
symbol is absent or 0); in its names ``{m}`` is the MTP layer index and ``{n}``
the index the layer has in a checkpoint that stores MTP layers after the
decoder's (``num_layers + m``, DeepSeek-V3 / GLM-4.5's ``model.layers.{n}``).
An MTP layer copies the decoder's last layer spec (megatron's rule), so a rule
limited to a layer kind applies to it when the last decoder layer is of that kind.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

from . import packing
from .errors import MappingError
from .pieces import Piece, pieces_for

if TYPE_CHECKING:
    from torch import Tensor

Shape = tuple[str | int, ...]
#: ``when``: a megatron config field whose truth includes the rule; ``"not x"`` negates;
#: a tuple includes the rule when any of its entries holds.
When = str | tuple[str, ...] | None


@dataclass(frozen=True)
class Rule:
    """One megatron tensor and the source tensors it is made from (see the module table)."""

    hf: tuple[str, ...]
    megatron: str
    kind: str
    shapes: tuple[Shape, ...]
    when: When = None
    #: the layer kind this rule applies to (``None``: every layer); see :func:`expand`
    layers: str | None = None

    def holds(self, fields: Mapping[str, Any]) -> bool:
        """Whether this rule applies to a model with megatron config ``fields``."""
        if self.when is None:
            return True
        alternatives = (self.when,) if isinstance(self.when, str) else self.when
        return any(_condition(fields, text) for text in alternatives)


def _condition(fields: Mapping[str, Any], text: str) -> bool:
    negate = text.startswith("not ")
    return bool(fields.get(text[4:] if negate else text)) != negate


def direct(hf: str, megatron: str, shape: Shape, when: When = None) -> Rule:
    return Rule((hf,), megatron, "copy", (shape,), when)


def fused_gate_up(hf: str, megatron: str, shape: Shape, when: When = None) -> Rule:
    """A stored ``gate_up_proj`` (``[gate; up]``, ``shape`` is the whole tensor's)."""
    return Rule((hf,), megatron, "copy", (shape,), when)


def vocab_rows(hf: str, megatron: str, shape: Shape = ("V", "H"), when: When = None) -> Rule:
    return Rule((hf,), megatron, "vocab", (shape,), when)


def grouped_qkv(q: str, k: str, v: str, megatron: str, q_shape: Shape, kv_shape: Shape, when: When = None) -> Rule:
    return Rule((q, k, v), megatron, "qkv", (q_shape, kv_shape, kv_shape), when)


def fused_qkv(hf: str, megatron: str, shape: Shape, when: When = None) -> Rule:
    """A stored ``[q; k; v]``; ``shape`` is the whole tensor's (rows ``Q + 2 * KV``)."""
    return Rule((hf,), megatron, "fused_qkv", (shape,), when)


def gated_fc1(gate: str, up: str, megatron: str, shape: Shape, when: When = None) -> Rule:
    return Rule((gate, up), megatron, "gate_up", (shape, shape), when)


def transposed(hf: str, megatron: str, shape: Shape, when: When = None) -> Rule:
    """``shape`` is the stored (``[in, out]``) one."""
    return Rule((hf,), megatron, "transposed", (shape,), when)


def transposed_qkv(hf: str, megatron: str, shape: Shape, when: When = None) -> Rule:
    return Rule((hf,), megatron, "transposed_qkv", (shape,), when)


@dataclass(frozen=True)
class Table:
    """An ordered, immutable set of rules with the edits architectures derive from each other by."""

    rules: tuple[Rule, ...]

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __add__(self, other: Iterable[Rule]) -> "Table":
        return Table(self.rules + tuple(other))

    def renamed(self, renames: Mapping[str, str]) -> "Table":
        """Source names with each ``old`` fragment replaced by ``new`` (megatron names unchanged)."""
        def rename(name: str) -> str:
            for old, new in renames.items():
                name = name.replace(old, new)
            return name
        return Table(tuple(dataclasses.replace(r, hf=tuple(rename(n) for n in r.hf)) for r in self.rules))

    def without(self, *megatron_names: str) -> "Table":
        """The table less the rules for these megatron name templates (a missing one is an error)."""
        unknown = set(megatron_names) - {r.megatron for r in self.rules}
        if unknown:
            raise KeyError(f"no rule for {sorted(unknown)}")
        return Table(tuple(r for r in self.rules if r.megatron not in megatron_names))

    def when(self, megatron_name: str, when: When) -> "Table":
        """The table with one rule's condition replaced."""
        return self.replace(megatron_name, lambda r: dataclasses.replace(r, when=when))

    def replace(self, megatron_name: str, change: Callable[[Rule], Rule]) -> "Table":
        if megatron_name not in {r.megatron for r in self.rules}:
            raise KeyError(f"no rule for {megatron_name!r}")
        return Table(tuple(change(r) if r.megatron == megatron_name else r for r in self.rules))


def table(*rules: Rule | Iterable[Rule]) -> Table:
    """A :class:`Table` from rules and iterables of rules (e.g. :func:`layer` groups)."""
    flat: list[Rule] = []
    for item in rules:
        flat.extend([item] if isinstance(item, Rule) else item)
    return Table(tuple(flat))


def for_layers(kind: str, rules: Iterable[Rule]) -> list[Rule]:
    """``rules`` limited to the layers of ``kind`` (e.g. ``"moe"`` for a mixture-of-experts block)."""
    return [dataclasses.replace(r, layers=kind) for r in rules]


def layer(hf_prefix: str, rules: Iterable[Rule], megatron_prefix: str = "decoder.layers.{i}.") -> list[Rule]:
    """Per-layer rules written with short names, both sides prefixed (``{i}`` in the prefixes)."""
    return [dataclasses.replace(r, hf=tuple(hf_prefix + n for n in r.hf), megatron=megatron_prefix + r.megatron)
            for r in rules]


@dataclass(frozen=True)
class TensorMapping:
    """How one megatron tensor is built from (and split back into) source tensors.

    ``to_megatron`` takes the source tensors in ``hf_names`` order; ``to_hf``
    returns them in that order. Both check shapes and raise :class:`MappingError`.
    """

    hf_names: tuple[str, ...]
    megatron_name: str
    to_megatron: Callable[[list["Tensor"]], "Tensor"]
    to_hf: Callable[["Tensor"], list["Tensor"]]
    hf_shapes: tuple[tuple[int, ...], ...]
    megatron_shape: tuple[int, ...]
    #: Row layout for reading tensor-parallel shards directly (see :mod:`.pieces`);
    #: ``None`` makes the importer build the full tensor and slice it.
    pieces: tuple[Piece, ...] | None = None


Transforms = tuple[Callable[[list["Tensor"]], "Tensor"], Callable[["Tensor"], list["Tensor"]]]


def _transforms(kind: str, s: Mapping[str, int], name: str) -> Transforms:
    if kind == "copy":
        return (lambda ts: ts[0]), (lambda t: [t])
    if kind == "vocab":
        return (lambda ts: packing.pad_vocab(ts[0], s["Vp"])), (lambda t: [packing.unpad_vocab(t, s["V"])])
    g, d = s.get("G", 0), s.get("D", 0)
    if kind == "qkv":
        return (lambda ts: packing.pack_qkv(*ts, g, d, name)), (lambda t: list(packing.unpack_qkv(t, g, d, name)))
    if kind == "fused_qkv":
        def fused_to_hf(t: "Tensor") -> list["Tensor"]:
            import torch

            return [torch.cat(packing.unpack_qkv(t, g, d, name), dim=0)]
        return (lambda ts: packing.pack_qkv(*packing.split_fused_qkv(ts[0], s["Q"], s["KV"], name), g, d, name)), fused_to_hf
    if kind == "gate_up":
        return (lambda ts: packing.pack_gate_up(*ts, name)), (lambda t: list(packing.unpack_gate_up(t, name)))
    if kind == "transposed":
        return (lambda ts: packing.transpose(ts[0])), (lambda t: [packing.transpose(t)])
    if kind == "transposed_qkv":
        return ((lambda ts: packing.transposed_qkv_to_grouped(ts[0], s["NH"], d)),
                (lambda t: [packing.grouped_qkv_to_transposed(t, s["NH"], d)]))
    raise AssertionError(f"unknown mapping kind {kind!r}")


def megatron_shape(kind: str, hf_shapes: Sequence[tuple[int, ...]], sym: Mapping[str, int], name: str) -> tuple[int, ...]:
    """The megatron tensor's shape for source tensors of ``hf_shapes``, by the rules of the kinds.

    Worked out from the shapes instead of running the transform on meta
    tensors, so building a table needs no torch. The one layout the packing
    would refuse (query heads not a multiple of the groups) is refused here
    alike; ``tests/core/test_core_conversion_table.py`` checks every kind
    against the real transforms.
    """
    first = tuple(hf_shapes[0])
    if kind == "vocab":
        return (sym["Vp"], *first[1:])
    if kind in ("qkv", "fused_qkv", "transposed_qkv"):
        groups = sym["NH"] if kind == "transposed_qkv" else sym["G"]
        if sym["NH"] % groups:
            raise MappingError(name, f"{sym['NH']} query heads cannot be split into {groups} groups")
        if kind == "transposed_qkv":
            return first[::-1]
        return (sum(shape[0] for shape in hf_shapes), *first[1:])
    if kind == "gate_up":
        return (2 * first[0], *first[1:])
    if kind == "transposed":
        return first[::-1]
    return first


def checked_mapping(hf_names: tuple[str, ...], meg_name: str, kind: str, hf_shapes: tuple[tuple[int, ...], ...],
                    sym: Mapping[str, int]) -> TensorMapping:
    """The :class:`TensorMapping` of one rule instance, shape checks and row layout included."""
    fwd, bwd = _transforms(kind, sym, meg_name)
    meg_shape = megatron_shape(kind, hf_shapes, sym, meg_name)

    def check(name: str, t: "Tensor", shape: tuple[int, ...]) -> None:
        if tuple(t.shape) != shape:
            raise MappingError(name, f"has shape {tuple(t.shape)}, the config implies {shape}")

    def to_megatron(ts: list["Tensor"]) -> "Tensor":
        if len(ts) != len(hf_names):
            raise MappingError(meg_name, f"needs {len(hf_names)} source tensors {hf_names}, got {len(ts)}")
        for n, t, shape in zip(hf_names, ts, hf_shapes):
            check(n, t, shape)
        return fwd(list(ts))

    def to_hf(t: "Tensor") -> list["Tensor"]:
        check(meg_name, t, meg_shape)
        return bwd(t)

    pieces = pieces_for(kind, hf_names, hf_shapes, sym)
    return TensorMapping(hf_names, meg_name, to_megatron, to_hf, hf_shapes, meg_shape, pieces)


def instantiate(rule: Rule, sym: Mapping[str, int], *, i: int | None = None, e: int | None = None,
                names: Mapping[str, str] | None = None, m: int | None = None, n: int | None = None) -> TensorMapping:
    """One rule for layer ``i`` (or MTP layer ``m``, stored as layer ``n``) and expert ``e``
    (``None`` for a global tensor / a non-expert one)."""
    shapes = tuple(tuple(x if isinstance(x, int) else sym[x] for x in shape) for shape in rule.shapes)
    meg = rule.megatron.format(i=i, e=e, m=m, n=n, **(names or {}))
    return checked_mapping(tuple(h.format(i=i, e=e, m=m, n=n) for h in rule.hf), meg, rule.kind, shapes, sym)


def _instances(rule: Rule, sym: Mapping[str, int], i: int | None, names: Mapping[str, str] | None,
               m: int | None = None, n: int | None = None) -> list[TensorMapping]:
    experts = range(sym["E"]) if "{e}" in rule.megatron else (None,)
    return [instantiate(rule, sym, i=i, e=e, names=names, m=m, n=n) for e in experts]


def _is_global(rule: Rule) -> bool:
    return "{i}" not in rule.megatron and "{m}" not in rule.megatron


def expand(rules: Iterable[Rule], fields: Mapping[str, Any], sym: Mapping[str, int], num_layers: int,
           names: Mapping[str, str] | None = None, layer_kinds: Sequence[str] | None = None) -> list[TensorMapping]:
    """Every mapping of a model: global tensors first, then layer by layer.

    That order reads layer-ordered shard files sequentially. Rules whose
    ``when`` does not hold for ``fields`` are left out; a rule for a layer
    kind is expanded only where ``layer_kinds[i]`` is that kind.
    """
    if sym.get("Vp", 0) < sym.get("V", 0):
        raise MappingError("word_embeddings", f"padded vocab {sym['Vp']} is smaller than vocab {sym['V']}")
    if layer_kinds is not None and len(layer_kinds) != num_layers:
        raise MappingError("layers", f"{len(layer_kinds)} layer kinds for {num_layers} layers")
    kept = [r for r in rules if r.holds(fields)]
    out = [instantiate(r, sym, names=names) for r in kept if _is_global(r)]
    for i in range(num_layers):
        kind = layer_kinds[i] if layer_kinds is not None else None
        for rule in kept:
            if "{i}" in rule.megatron and rule.layers in (None, kind):
                out += _instances(rule, sym, i, names)
    last = layer_kinds[-1] if layer_kinds else None  # MTP layers copy the last layer's spec
    for m in range(sym.get("MTP", 0) or 0):
        for rule in kept:
            if "{m}" in rule.megatron and rule.layers in (None, last):
                out += _instances(rule, sym, None, names, m=m, n=num_layers + m)
    assert_unique(out)
    return out


def assert_unique(mappings: Sequence[TensorMapping]) -> None:
    """A table that uses a name twice is a bug in the table, not in the checkpoint."""
    seen: set[str] = set()
    for name in [n for m in mappings for n in m.hf_names] + [m.megatron_name for m in mappings]:
        if name in seen:
            raise AssertionError(f"tensor table uses '{name}' twice")
        seen.add(name)


def hf_to_megatron(mappings: Iterable[TensorMapping], read: Callable[[str], "Tensor"]) -> Iterator[tuple[str, "Tensor"]]:
    """Yield ``(megatron_name, tensor)`` one at a time, reading source tensors through ``read``."""
    for m in mappings:
        yield m.megatron_name, m.to_megatron([read(n) for n in m.hf_names])


def megatron_to_hf(mappings: Iterable[TensorMapping], read: Callable[[str], "Tensor"]) -> Iterator[tuple[str, "Tensor"]]:
    """Yield ``(source_name, tensor)`` pairs, reading megatron tensors through ``read``."""
    for m in mappings:
        yield from zip(m.hf_names, m.to_hf(read(m.megatron_name)))
