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
them: the config translation (:mod:`.hf_defaults`), every safetensors header
(:mod:`.safetensors_header`), the tensor table of a built-in adapter
(:func:`.mappings.mapping_for` needs no torch), the side files; for an export,
every file of the megatron checkpoint with ``.metadata`` read inertly
(:mod:`.dcp_metadata`). What needs the family's config class (megatron's
``TransformerConfig`` rules: heads divisible by TP ...) is checked by each
rank before it builds anything. A third-party adapter's tables need its
config object, so for those the launcher runs the full plan.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from .errors import ConversionError, TensorSetError

if TYPE_CHECKING:
    from plugtron.manager import PlugtronPluginManager

    from .mappings import TensorMapping
    from .safetensors_header import SafetensorsIndex

#: dtypes a model may be converted to (``--dtype``).
DTYPES = ("float32", "bfloat16", "float16")


def check_dtype_name(name: str | None) -> None:
    if name is not None and name not in DTYPES:
        raise ConversionError(f"dtype {name!r} is not supported; choose one of {', '.join(DTYPES)}")


def stored_dtype(index: "SafetensorsIndex", source: Path) -> str:
    """The floating dtype holding most bytes of the checkpoint: what the model keeps unless told otherwise."""
    totals: dict[str, int] = {}
    for entry in index.entries().values():
        if entry.is_floating_point:
            totals[entry.dtype_name] = totals.get(entry.dtype_name, 0) + entry.nbytes
    if not totals:
        raise ConversionError(f"{source}: the checkpoint holds no floating-point tensors")
    name = max(totals, key=totals.__getitem__)
    if name not in DTYPES:
        raise ConversionError(f"{source}: weights are stored as {name}; pass --dtype with one of {', '.join(DTYPES)}")
    return name


def check_table(index: "SafetensorsIndex", mappings: "Iterable[TensorMapping]", tolerated: Callable[[str], bool],
                dtype_name: str, architecture: str) -> list[str]:
    """Strict name, shape and dtype check of the whole table; returns the extra names that are tolerated.

    Every problem is collected first and all are raised together.
    """
    needed = {name: shape for m in mappings for name, shape in zip(m.hf_names, m.hf_shapes)}
    available = set(index.names())
    present = sorted(set(needed) & available)
    extra = sorted(available - set(needed))
    wrong = [f"{name} {index.shape(name)} != {needed[name]}" for name in present if index.shape(name) != needed[name]]
    error = TensorSetError.combined(str(index.directory), {
        f"tensors the {architecture} table needs are missing": sorted(set(needed) - available),
        "tensors present but used by no mapping": [name for name in extra if not tolerated(name)],
        "tensor shapes differ from what config.json implies": wrong,
        "tensors stored with a non-floating dtype where a float weight belongs": _not_floating(index, present, dtype_name),
    })
    if error is not None:
        raise error
    return extra


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
                     pm: "PlugtronPluginManager | None" = None) -> bool:
    """The launcher's checks of an HF checkpoint; False when the adapter needs the full plan instead.

    Raises the same errors :func:`~.importer.plan_import` raises for the config
    file, the architecture, the headers, the tensor table and the side files.
    """
    from .adapter import GPTAdapter, tolerated_unused
    from .hf_config import to_megatron_fields
    from .importer import identify_source, side_files
    from .mappings import mapping_for
    from .safetensors_header import SafetensorsIndex

    source, hf_config, where, arch, adapter = identify_source(src, dtype, pm)
    if type(adapter) is not GPTAdapter:
        return False
    fields = to_megatron_fields(hf_config, arch, source=where)
    side_files(source)
    index = SafetensorsIndex(source)
    dtype_name = dtype or stored_dtype(index, source)
    tied = bool(fields["share_embeddings_and_output_weights"])
    check_table(index, mapping_for(arch, fields), lambda name: tolerated_unused(name, tied), dtype_name, arch)
    return True


def preflight_export(src: str | Path) -> Any:
    """The launcher's checks of a megatron checkpoint (every file, ``.metadata`` read inertly); its bridge metadata."""
    from .checkpoint import read_meta

    return read_meta(src, inert=True)
