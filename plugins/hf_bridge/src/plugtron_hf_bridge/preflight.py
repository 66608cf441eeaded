"""What is checked before a conversion starts, and what a launcher checks without torch.

:func:`check_table` is the one comparison of a checkpoint with an adapter's
tensor table: missing, unused, mis-shaped and non-floating tensors are all
collected and reported together in one :class:`TensorSetError`, so fixing a
checkpoint takes one run. :func:`~.importer.plan_import` uses it, and so does
:func:`preflight_import`.

A command that starts several ranks validates its input in the launcher first
(bad input is one line with exit code 2, before any rank starts). Importing
torch, megatron-core and transformers there would cost 2-5 s on this machine
before the ranks import them again, so the launcher's checks import none of
them: the config translation and tensor table of an adapter that offers
``torch_free_table`` (the families' built-in ones do), every safetensors header
(:mod:`.safetensors_header`), the side files; for an export,
every file of the megatron checkpoint with ``.metadata`` read inertly
(:mod:`.dcp_metadata`). What needs the family's config class (megatron's
``TransformerConfig`` rules: heads divisible by TP ...) is checked by each
rank before it builds anything. An adapter without ``torch_free_table`` needs its
config object for its tables, so for those the launcher runs the full plan.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from .errors import ConversionError, TensorSetError

if TYPE_CHECKING:
    from plugtron.manager import PlugtronPluginManager

    from plugtron.conversion import TensorMapping
    from .safetensors_header import SafetensorsIndex

#: dtypes a model may be converted to (``--dtype``).
DTYPES = ("float32", "bfloat16", "float16")


def check_dtype_name(name: str | None) -> None:
    if name is not None and name not in DTYPES:
        raise ConversionError(f"dtype {name!r} is not supported; choose one of {', '.join(DTYPES)}")


def stored_dtype(index: "SafetensorsIndex", source: Path, quantized: bool = False) -> str:
    """The floating dtype holding most bytes of the checkpoint: what the model keeps unless told otherwise.

    A quantised checkpoint (``quantized``: config.json has a ``quantization_config`` the engine reads)
    is dequantised to bfloat16 unless told otherwise (:mod:`.quantization`).
    """
    if quantized:
        return "bfloat16"
    totals: dict[str, int] = {}
    for entry in index.entries().values():
        if entry.is_floating_point:
            totals[entry.dtype_name] = totals.get(entry.dtype_name, 0) + entry.nbytes
    if not totals:
        raise ConversionError(f"{source}: the checkpoint holds no floating-point tensors")
    name = max(totals, key=totals.__getitem__)
    if name.startswith("float8"):
        raise ConversionError(f"{source}: weights are stored as {name} without a quantization_config in config.json; "
                              "their scales are unknown, so they cannot be dequantised")
    if name not in DTYPES:
        raise ConversionError(f"{source}: weights are stored as {name}; pass --dtype with one of {', '.join(DTYPES)}")
    return name


def check_table(index: "SafetensorsIndex", mappings: "Iterable[TensorMapping]", tolerated: Callable[[str], bool],
                dtype_name: str, architecture: str, quantization: Any = None) -> list[str]:
    """Strict name, shape and dtype check of the whole table; returns the extra names that are tolerated.

    Every problem is collected first and all are raised together. ``quantization`` (a
    :class:`.quantization.Scheme`, or None): the block scales of the table's FP8 weights are
    their companions, not unused tensors, and must fit their weights; float8 or MXFP4 tensors
    the engine cannot dequantise are refused by name.
    """
    from . import quantization as q

    needed = {name: shape for m in mappings for name, shape in zip(m.hf_names, m.hf_shapes)}
    available = set(index.names())
    present = sorted(set(needed) & available)
    scales = {s for w, s in q.scaled_weights(index, quantization).items() if w in needed}
    extra = sorted(available - set(needed) - scales)
    wrong = [f"{name} {index.shape(name)} != {needed[name]}" for name in present if index.shape(name) != needed[name]]
    error = TensorSetError.combined(str(index.directory), {
        f"tensors the {architecture} table needs are missing": sorted(set(needed) - available),
        "tensors present but used by no mapping": [name for name in extra if not _tolerated(name, tolerated)],
        "tensor shapes differ from what config.json implies": wrong,
        "tensors stored with a non-floating dtype where a float weight belongs": _not_floating(index, present, dtype_name),
        **q.problems(index, present, quantization),
    })
    if error is not None:
        raise error
    return extra


def _tolerated(name: str, tolerated: Callable[[str], bool]) -> bool:
    """Tolerated itself, or the scale (or MXFP4 part) of a tolerated tensor: it goes where its weight goes."""
    from .quantization import companion_of

    base = companion_of(name)
    return tolerated(name) or (base is not None and tolerated(base))


def _not_floating(index: "SafetensorsIndex", names: list[str], dtype_name: str) -> list[str]:
    """An integer or bool tensor (I32 where F32 belongs has the same byte size, so nothing else notices)
    would be reinterpreted or cast into garbage weights."""
    out = []
    for name in names:
        entry = index.entry(name)
        if not entry.is_floating_point:
            out.append(f"{name} in {entry.file.name} is stored as {entry.dtype_name} (the model holds it as {dtype_name})")
    return out


def preflight_import(src: str | Path, *, dtype: str | None = None,
                     pm: "PlugtronPluginManager | None" = None, ep: int = 1, etp: int | None = None) -> bool:
    """The launcher's checks of an HF checkpoint; False when the adapter needs the full plan instead.

    Raises the same errors :func:`~.importer.plan_import` raises for the config
    file, the architecture, the headers, the tensor table and the side files,
    and refuses an expert layout (``ep`` / ``etp``) the model cannot take.
    """
    from .importer import identify_source, side_files
    from .safetensors_header import SafetensorsIndex

    source, hf_config, where, arch, adapter = identify_source(src, dtype, pm)
    torch_free_table = getattr(adapter, "torch_free_table", None)
    if torch_free_table is None:
        return False
    if hasattr(adapter, "to_fields"):  # the config first, as the full plan checks it
        check_expert_layout(adapter.to_fields(hf_config, source=where), ep, etp, where)
    side_files(source)
    from .quantization import scheme_of

    scheme = scheme_of(hf_config, where)
    index = SafetensorsIndex(source)
    mappings, tolerated = torch_free_table(hf_config, source=where, names=index.names())
    dtype_name = dtype or stored_dtype(index, source, scheme is not None)
    check_table(index, mappings, tolerated, dtype_name, arch, scheme)
    return True


def check_expert_layout(fields: dict[str, Any], ep: int, etp: int | None, where: str) -> None:
    """Before any rank starts: expert parallelism only for a MoE model, over a whole number of experts each.

    The ranks check every other rule of the layout (megatron's, in the family's config).
    """
    experts = fields.get("num_moe_experts")
    if not experts and (ep != 1 or etp is not None):
        raise ConversionError(f"{where}: --ep/--etp apply to Mixture-of-Experts models only; this one is dense")
    if experts and experts % ep:
        raise ConversionError(f"{where}: {experts} routed experts cannot be split over --ep {ep} ranks")


def preflight_export(src: str | Path) -> Any:
    """The launcher's checks of a megatron checkpoint (every file, ``.metadata`` read inertly); its bridge metadata."""
    from .checkpoint import read_meta

    return read_meta(src, inert=True)
