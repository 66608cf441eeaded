"""Reading ``weights/.metadata`` of a megatron checkpoint without running code from it.

torch's distributed-checkpoint (DCP) format keeps its table of contents in a
pickle, and ``FileSystemReader.read_metadata`` loads it with plain
``pickle.load``: a crafted ``.metadata`` runs any code its author chose the
moment a stranger's checkpoint is converted. This module reads it with an
unpickler that builds only the classes such a file legitimately holds (see
:data:`ALLOWED_GLOBALS`) and refuses any other global by name, then checks the
structure it got: every shard file it points at must be a regular file inside
the ``weights`` directory, long enough for the bytes it is said to hold, and
stored without transforms (compression) that megatron never writes.

Found by listing the globals of real checkpoints (torch 2.13, megatron-core
0.16.1): torch's own metadata dataclasses, ``torch.Size``, dtypes and
``torch.serialization._get_layout``, ``pathlib.PosixPath`` (torch's writer
stores the checkpoint path as one); megatron adds ``all_local_plans`` (the
save plans of every rank: ``SavePlan``, ``WriteItem`` ...) and, in older
versions, its placeholder classes ``MCoreMetadata`` / ``MCoreSavePlan``.

A launcher checks a checkpoint before any rank starts, without importing torch
(about a second it would add to every multi-rank command): with ``inert=True``
every allowed global is built as an inert stand-in that only keeps the values
the pickle hands it (no torch class is even imported), and the same structure
and shard-file checks run on those. The ranks then read it again with the
real classes.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
from pathlib import Path
from typing import Any

from plugtron.untrusted import read_bytes_capped, regular_file_inside

from .errors import CheckpointFormatError, checkpoint_errors

METADATA_FILE = ".metadata"

#: A model's table of contents is kilobytes to a few MB (megatron also stores every rank's save
#: plan in it, so thousands of ranks and tensors add up); past this it is not a real one.
MAX_METADATA_BYTES = 512 * 2**20

_DCP = "torch.distributed.checkpoint"
#: (module, name) of every global a ``.metadata`` may hold. Each is a plain data class, an enum,
#: ``torch.Size`` or a name lookup: building one runs no code chosen by the file.
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    *((f"{_DCP}.metadata", name) for name in (
        "Metadata", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "_MEM_FORMAT_ENCODING")),
    *((f"{_DCP}.planner", name) for name in (
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData")),
    (f"{_DCP}.filesystem", "_StorageInfo"),
    (f"{_DCP}.filesystem", "_StoragePrefix"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a dictionary lookup of torch.strided and friends
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id as torch's own FileSystemWriter stores it
    ("megatron.core.dist_checkpointing.strategies.torch", "MCoreMetadata"),
    ("megatron.core.dist_checkpointing.strategies.torch", "MCoreSavePlan"),
})


#: Every dtype name in torch's namespace (torch 2.13), for the inert reading, which must not import torch;
#: ``test_hfb_speed_paths`` checks it against the installed torch.
DTYPE_NAMES = frozenset({
    "bfloat16", "bit", "bits16", "bits1x8", "bits2x4", "bits4x2", "bits8", "bool", "cdouble", "cfloat", "chalf",
    "complex128", "complex32", "complex64", "double", "float", "float16", "float32", "float4_e2m1fn_x2", "float64",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu", "half", "int", "int1",
    "int16", "int2", "int3", "int32", "int4", "int5", "int6", "int64", "int7", "int8", "long", "qint32", "qint8",
    "quint2x4", "quint4x2", "quint8", "short", "uint1", "uint16", "uint2", "uint3", "uint32", "uint4", "uint5",
    "uint6", "uint64", "uint7", "uint8",
})


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only :data:`ALLOWED_GLOBALS` and torch dtypes (``torch.float32`` is pickled by name).

    With ``inert``, each of them is an :class:`_Inert` stand-in instead of the real class.
    """

    def __init__(self, file: Any, *, inert: bool = False) -> None:
        super().__init__(file)
        self.inert = inert

    def find_class(self, module: str, name: str) -> Any:
        allowed = (module, name) in ALLOWED_GLOBALS or (module == "torch" and _is_dtype_name(name, self.inert))
        if not allowed:
            raise _RefusedGlobal(f"{module}.{name}")
        return _inert_class(module, name) if self.inert else super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise _RefusedGlobal(f"persistent id {pid!r}")


class _RefusedGlobal(pickle.UnpicklingError):
    """Raised from inside the unpickler, so nothing after the refused global is built."""


def _is_dtype_name(name: str, inert: bool = False) -> bool:
    return name in (DTYPE_NAMES if inert else _dtype_names())


class _Inert:
    """Stands for an allowed global in the inert reading: keeps the arguments and state it is given, runs nothing."""

    _global: tuple[str, str] = ("", "")

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # REDUCE: torch.Size((2, 3)), an enum's value ...
        self.__dict__["_args"] = args

    def __setstate__(self, state: Any) -> None:  # BUILD: a dict, or (dict, slots) for classes with slots
        for part in state if isinstance(state, tuple) else (state,):
            if isinstance(part, dict):
                self.__dict__.update(part)


@functools.cache
def _inert_class(module: str, name: str) -> type:
    return type(name, (_Inert,), {"_global": (module, name)})


def _kind(obj: Any) -> str:
    """``module.Name`` of ``obj``'s class: the real one's, or the global an inert stand-in stands for."""
    cls = type(obj)
    module, name = getattr(cls, "_global", None) or (cls.__module__, cls.__qualname__)
    return f"{module}.{name}"


@functools.cache
def _dtype_names() -> frozenset[str]:
    """Names bound to dtypes in ``torch``'s namespace (``vars``: ``getattr`` would import lazy submodules)."""
    import torch

    return frozenset(key for key, value in vars(torch).items() if isinstance(value, torch.dtype))


def unpickle_metadata(raw: bytes, path: str | Path, *, inert: bool = False) -> Any:
    """The object pickled in ``raw`` if it uses only allowed globals; errors name ``path`` (``inert``: see the module doc)."""
    try:
        return _MetadataUnpickler(io.BytesIO(raw), inert=inert).load()
    except _RefusedGlobal as exc:
        raise CheckpointFormatError(path, f"refusing to unpickle global '{exc}': torch distributed-checkpoint "
                                          "metadata never holds it (the file may be crafted to run code)") from None
    except Exception as exc:  # truncated or malformed pickle: EOFError, UnpicklingError, TypeError ...
        raise CheckpointFormatError(path, f"unreadable distributed-checkpoint metadata "
                                          f"({type(exc).__name__}: {exc})") from exc


def read_metadata(weights: str | Path, *, inert: bool = False) -> Any:
    """``weights/.metadata`` read safely and checked against the files beside it (see the module doc)."""
    weights = Path(weights)
    with checkpoint_errors():
        path = regular_file_inside(weights, METADATA_FILE)
        raw = read_bytes_capped(path, MAX_METADATA_BYTES)
    metadata = unpickle_metadata(raw, path, inert=inert)
    _check_structure(metadata, path)
    check_shard_files(metadata, weights)
    return metadata


_METADATA = (f"{_DCP}.metadata.Metadata", "megatron.core.dist_checkpointing.strategies.torch.MCoreMetadata")
_ENTRIES = (f"{_DCP}.metadata.TensorStorageMetadata", f"{_DCP}.metadata.BytesStorageMetadata")


def _check_structure(metadata: Any, path: Path) -> None:
    """The types torch's loader relies on, so a wrong one is named here and not deep inside it.

    Types are compared by name: only allow-listed globals can be built at all,
    so the name identifies the class, for the real ones and the inert stand-ins alike.
    """
    if _kind(metadata) not in _METADATA:
        raise CheckpointFormatError(path, f"holds a {type(metadata).__name__}, not distributed-checkpoint Metadata")
    entries, storage = getattr(metadata, "state_dict_metadata", None), getattr(metadata, "storage_data", None)
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        raise CheckpointFormatError(path, "state_dict_metadata and storage_data must be dictionaries")
    storage_meta = getattr(metadata, "storage_meta", None)
    if storage_meta is not None and _kind(storage_meta) != f"{_DCP}.metadata.StorageMeta":
        raise CheckpointFormatError(path, "storage_meta must be StorageMeta")
    for key, entry in entries.items():
        if not isinstance(key, str) or _kind(entry) not in _ENTRIES:
            raise CheckpointFormatError(path, f"entry {key!r} is a {type(entry).__name__}, "
                                              "not tensor or bytes metadata")
    for index, info in storage.items():
        if _kind(index) != f"{_DCP}.metadata.MetadataIndex" or _kind(info) != f"{_DCP}.filesystem._StorageInfo":
            raise CheckpointFormatError(path, f"storage entry {index!r} is malformed")
        _check_location(info, getattr(index, "fqn", None), path)


def _check_location(info: Any, fqn: Any, path: Path) -> None:
    name, offset, length = (getattr(info, key, None) for key in ("relative_path", "offset", "length"))
    if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", "..") or "\x00" in name:
        raise CheckpointFormatError(path, f"tensor '{fqn}' is stored in {name!r}, not a file name in this directory")
    if not all(isinstance(v, int) and v >= 0 for v in (offset, length)):
        raise CheckpointFormatError(path, f"tensor '{fqn}' has an invalid offset/length ({offset!r}, {length!r})")
    if getattr(info, "transform_descriptors", None):
        transforms = list(info.transform_descriptors)
        raise CheckpointFormatError(path, f"tensor '{fqn}' is stored with transforms {transforms} (compression); "
                                          "megatron checkpoints have none, refusing them")


def check_shard_files(metadata: Any, weights: Path) -> None:
    """Every shard file named is a regular file inside ``weights`` and holds the bytes listed for it.

    A truncated ``__0_1.distcp`` is reported here by name, before any rank reads it.
    """
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(needed.items()):
        with checkpoint_errors():
            path = regular_file_inside(weights, name)
        size = path.stat().st_size
        if size < end:
            raise CheckpointFormatError(path, f"is truncated: {size:,} bytes, but {METADATA_FILE} "
                                              f"places data up to byte {end:,}")
