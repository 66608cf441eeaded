"""Reading and writing HF-style safetensors checkpoints, safely and in bounded memory.

Why not just ``safetensors.torch.load_file``?

- Pickle checkpoints (``*.bin``, ``*.pt``) can run arbitrary code when loaded,
  so this module refuses them outright instead of silently falling back.
- ``safe_open`` memory-maps lazily: a truncated download is only noticed when a
  tensor near the end is touched, possibly hours into a conversion.  We parse
  every header ourselves up front and check it against the file size.
- Converting a 70B model must not hold the whole model in memory: the reader
  serves single tensors or row/column ranges (for tensor-parallel shards), and
  the writer flushes a shard file as soon as it reaches its size limit.
- A crashed export must never leave a half-written directory that looks like a
  checkpoint: :func:`plugtron._atomic.atomic_output_dir` publishes a directory only on success.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from plugtron.untrusted import DuplicateKeyError, UntrustedFileError, parse_json_strict, read_json, regular_file_inside

from .errors import CheckpointFormatError, ConversionError, TensorNotFoundError, checkpoint_errors

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_MAX_HEADER_BYTES = 100 * 2**20  # the format's own reference limit

# safetensors dtype tag -> (torch dtype, bytes per element)
_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
    "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1),
    "U16": (torch.uint16, 2), "U32": (torch.uint32, 4), "U64": (torch.uint64, 8),
    "BOOL": (torch.bool, 1), "F8_E4M3": (torch.float8_e4m3fn, 1), "F8_E5M2": (torch.float8_e5m2, 1),
}


class TensorInfo(NamedTuple):
    """What a safetensors header says about one tensor."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    #: Absolute byte offset of the tensor's data in ``file`` (for direct reads).
    offset: int = -1


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header without reading any tensor data.

    Raises :class:`CheckpointFormatError` naming ``path`` (and the tensor where
    relevant) if the header is malformed, names a tensor twice, points past the
    end of the file, or its tensors do not tile the data section exactly. The
    reference reader refuses such files as well, and overlapping byte ranges
    would let one tensor's bytes be read as another's.
    """
    path = Path(path)
    header_len, raw, size = _header_bytes(path)
    header = _parse_header(path, raw)
    data_size = size - 8 - header_len
    infos: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            _check_metadata(path, entry)
            continue
        dtype, shape, begin, end = _entry(path, name, entry)
        if end > data_size:
            raise CheckpointFormatError(
                path, f"truncated: tensor '{name}' ends at byte {end} of the data section but only {data_size} bytes are present"
            )
        infos[name] = TensorInfo(dtype, shape, path, 8 + header_len + begin)
        spans.append((begin, end, name))
    _check_tiling(path, spans, data_size)
    return infos


def _header_bytes(path: Path) -> tuple[int, bytes, int]:
    """(header length, header JSON bytes, file size), refusing files too short for what they claim."""
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise CheckpointFormatError(path, "is not a regular file; refusing to read it")
            size = info.st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointFormatError(path, f"file is {size} bytes, too short for a safetensors header")
            header_len = int.from_bytes(prefix, "little")
            if header_len > _MAX_HEADER_BYTES:
                raise CheckpointFormatError(path, f"header length {header_len} is implausible; not a safetensors file?")
            if 8 + header_len > size:
                raise CheckpointFormatError(
                    path, f"truncated: header needs {header_len} bytes but the file has {size - 8} after the length prefix"
                )
            return header_len, f.read(header_len), size
    except OSError as exc:
        raise CheckpointFormatError(path, f"cannot read file: {exc}") from exc


def _parse_header(path: Path, raw: bytes) -> dict[str, Any]:
    """The header as a dict; a key listed twice is refused (JSON readers disagree on which entry wins)."""
    try:
        header = parse_json_strict(raw, path)
    except UntrustedFileError as exc:
        duplicate = exc.__cause__
        if isinstance(duplicate, DuplicateKeyError):
            problem = f"header lists '{duplicate.key}' twice; tensor names (and entry fields) must be unique"
            raise CheckpointFormatError(path, problem) from exc
        raise CheckpointFormatError(path, f"header {exc.problem}") from exc
    if not isinstance(header, dict):
        raise CheckpointFormatError(path, "header is not a JSON object")
    return header


def _check_metadata(path: Path, metadata: Any) -> None:
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointFormatError(path, f"header '__metadata__' must map strings to strings, got {metadata!r:.200}")


def _non_negative_ints(value: Any, length: int | None = None) -> tuple[int, ...]:
    """A JSON list of non-negative integers (not floats, strings or booleans), else ValueError."""
    if not isinstance(value, list) or (length is not None and len(value) != length):
        raise ValueError(value)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise ValueError(value)
    return tuple(value)


def _entry(path: Path, name: str, entry: Any) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, its byte count matching dtype and shape."""
    try:
        dtype, itemsize = _DTYPES[entry["dtype"]]
        shape = _non_negative_ints(entry["shape"])
        begin, end = _non_negative_ints(entry["data_offsets"], 2)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointFormatError(path, f"tensor '{name}' has a malformed or unsupported header entry {entry!r:.300}") from exc
    if begin > end or end - begin != math.prod(shape) * itemsize:
        raise CheckpointFormatError(path, f"tensor '{name}': offsets {begin}..{end} do not fit shape {shape} of {entry['dtype']}")
    return dtype, shape, begin, end


def _check_tiling(path: Path, spans: list[tuple[int, int, str]], data_size: int) -> None:
    """The format's layout rule: sorted by (begin, end), each tensor starts where the previous one
    ended, the first at 0 and the last at the end of the data section; no overlap, gap or trailing
    bytes (the reference reader refuses all three). A zero-size tensor takes no bytes, so it may sit
    at any boundary between tensors, but not inside one."""
    at, previous = 0, None
    for begin, end, name in sorted(spans):
        if begin < at:
            problem = f"tensor '{name}' (bytes {begin}..{end}) overlaps tensor '{previous}', which ends at byte {at}"
            raise CheckpointFormatError(path, problem)
        if begin > at:
            after = f"after tensor '{previous}'" if previous else "at the start of the data section"
            raise CheckpointFormatError(path, f"tensor '{name}' starts at byte {begin}, leaving a gap of {begin - at} bytes {after}")
        at, previous = end, name
    if at != data_size:
        last = f" ('{previous}')" if previous else ""
        raise CheckpointFormatError(path, f"the data section has {data_size - at} bytes after the last tensor{last} that none claims")


def _present(path: Path) -> bool:
    """Exists, or is a symlink (even a dangling one, which must be refused by name, not reported as absent)."""
    return path.exists() or path.is_symlink()


class SafetensorsCheckpoint:
    """Lazy, validated read access to a ``model.safetensors`` or sharded HF checkpoint.

    All headers are checked at construction; file handles are opened on first
    use and kept until :meth:`close` (or the end of a ``with`` block).
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointFormatError(self.directory, "checkpoint directory does not exist")
        single, index = self.directory / SINGLE_FILE, self.directory / INDEX_FILE
        if _present(single) and _present(index):
            raise CheckpointFormatError(
                self.directory, f"both {SINGLE_FILE} and {INDEX_FILE} exist; remove the stale one so the checkpoint is unambiguous"
            )
        self._infos: dict[str, TensorInfo] = {}
        if _present(index):
            self._load_index(self._member(INDEX_FILE))
        elif _present(single):
            self._infos = read_header(self._member(SINGLE_FILE))
        else:
            pickles = sorted(p.name for p in self.directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise CheckpointFormatError(
                    self.directory,
                    f"only safetensors checkpoints are read; refusing pickle file(s) {pickles} "
                    "(unpickling can execute code). Convert them to safetensors with a trusted tool first",
                )
            others = sorted(p.name for p in self.directory.glob("*.safetensors"))
            raise CheckpointFormatError(
                self.directory, f"no {SINGLE_FILE} or {INDEX_FILE} found" + (f" (found {others})" if others else "")
            )
        self._handles: dict[Path, Any] = {}

    def _member(self, name: str, *, required: bool = True) -> Path | None:
        """``name`` in the checkpoint directory, only if it is a regular file that stays inside it
        (a link to ``/dev/zero`` or out of the directory is refused by name, never followed)."""
        with checkpoint_errors():
            return regular_file_inside(self.directory, name, required=required)

    def _load_index(self, index: Path) -> None:
        with checkpoint_errors():
            weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointFormatError(index, f"unreadable shard index: 'weight_map' must be a JSON object, got {weight_map!r:.100}")
        headers: dict[str, dict[str, TensorInfo]] = {}
        for name, fname in weight_map.items():
            if not isinstance(fname, str) or Path(fname).name != fname or fname in ("", ".", ".."):
                raise CheckpointFormatError(index, f"tensor '{name}' maps to {fname!r}, which is not a plain file name")
            if fname not in headers:
                shard = self._member(fname, required=False)
                if shard is None:
                    raise CheckpointFormatError(self.directory / fname, f"shard listed in {INDEX_FILE} is missing")
                headers[fname] = read_header(shard)
            if name not in headers[fname]:
                raise CheckpointFormatError(self.directory / fname, f"{INDEX_FILE} says tensor '{name}' is here, but it is not")
            self._infos[name] = headers[fname][name]

    # -- metadata ---------------------------------------------------------------------------------
    def _info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise TensorNotFoundError(self.directory, name) from None

    def info(self, name: str) -> TensorInfo:
        """dtype, shape, file and data offset of ``name`` (from the validated header)."""
        return self._info(name)

    def names(self) -> list[str]:
        """All tensor names, sorted."""
        return sorted(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self._info(name).dtype

    def file_of(self, name: str) -> Path:
        return self._info(name).file

    # -- data -------------------------------------------------------------------------------------
    def _handle(self, path: Path) -> Any:
        handle = self._handles.get(path)
        if handle is None:
            try:
                handle = safe_open(str(path), framework="pt")
                handle.__enter__()
            except Exception as exc:  # safetensors raises its own error type
                raise CheckpointFormatError(path, f"cannot open: {exc}") from exc
            self._handles[path] = handle
        return handle

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor ``name``."""
        info = self._info(name)
        return self._handle(info.file).get_tensor(name)

    def read_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows/columns ``start:stop`` of ``name`` along ``dim``; only those bytes are read."""
        info = self._info(name)
        ndim = len(info.shape)
        if not -ndim <= dim < ndim:
            raise CheckpointFormatError(info.file, f"tensor '{name}': dim {dim} is out of range for shape {info.shape}")
        dim %= ndim
        if not 0 <= start <= stop <= info.shape[dim]:
            raise CheckpointFormatError(
                info.file, f"tensor '{name}': slice {start}:{stop} on dim {dim} is outside its shape {info.shape}"
            )
        index = (slice(None),) * dim + (slice(start, stop),)
        return self._handle(info.file).get_slice(name)[index]

    def close(self) -> None:
        """Close every open file handle; the object may be reused (handles reopen lazily)."""
        handles, self._handles = self._handles, {}
        for handle in handles.values():
            handle.__exit__(None, None, None)

    def __enter__(self) -> "SafetensorsCheckpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ShardedSafetensorsWriter:
    """Stream tensors into size-limited safetensors shards plus an HF index.

    Shards are written under temporary names while streaming (their final
    ``-of-N`` is unknown until the end) and renamed by :meth:`close`.  Only
    the current shard is held in memory.
    """

    def __init__(
        self, directory: str | Path, max_shard_bytes: int = 5 * 2**30, metadata: dict[str, str] | None = None
    ) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        stale = sorted(p.name for p in self.directory.iterdir() if p.name.startswith("model") and ".safetensors" in p.name)
        if stale:
            raise CheckpointFormatError(self.directory, f"already holds checkpoint files {stale}; write into an empty directory")
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt"} if metadata is None else dict(metadata)
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._storages: dict[int, list[tuple[int, int]]] = {}
        self._shards: list[tuple[Path, list[str]]] = []
        self._seen: set[str] = set()
        self._total_bytes = 0
        self._closed = False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue ``tensor`` under ``name``; flushes the current shard first if it would overflow.

        The tensor is kept by reference until its shard is flushed: do not modify it in place meanwhile.
        """
        if self._closed:
            raise ConversionError(f"writer for {self.directory} is closed; cannot add tensor '{name}'")
        if name in self._seen:
            raise CheckpointFormatError(self.directory, f"tensor '{name}' was added twice")
        tensor = tensor.detach().to("cpu").contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        # safetensors rejects tensors whose bytes overlap (tied weights, a view and its base); disjoint
        # views of one storage (gate/up halves of a fused weight) are fine and are not copied.
        span = (tensor.data_ptr(), tensor.data_ptr() + nbytes)
        key = tensor.untyped_storage().data_ptr()
        if any(lo < span[1] and span[0] < hi for lo, hi in self._storages.get(key, ())):
            tensor = tensor.clone()
            span, key = (tensor.data_ptr(), tensor.data_ptr() + nbytes), tensor.untyped_storage().data_ptr()
        self._storages.setdefault(key, []).append(span)
        self._pending[name] = tensor
        self._seen.add(name)
        self._pending_bytes += nbytes
        self._total_bytes += nbytes

    def _flush(self) -> None:
        path = self.directory / f".tmp-shard-{len(self._shards) + 1:05d}.safetensors"
        save_file(self._pending, str(path), metadata=self.metadata)
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes, self._storages = {}, 0, {}

    def close(self) -> None:
        """Write the last shard, give shards their final names and write the index if sharded."""
        if self._closed:
            return
        if self._pending:
            self._flush()
        self._closed = True
        if not self._shards:
            raise CheckpointFormatError(self.directory, "no tensors were added; refusing to write an empty checkpoint")
        if len(self._shards) == 1:
            os.replace(self._shards[0][0], self.directory / SINGLE_FILE)
            return
        total = len(self._shards)
        weight_map: dict[str, str] = {}
        for i, (tmp, names) in enumerate(self._shards, start=1):
            final = f"model-{i:05d}-of-{total:05d}.safetensors"
            os.replace(tmp, self.directory / final)
            weight_map.update((n, final) for n in names)
        index = {"metadata": {"total_size": self._total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        """Drop queued tensors and delete shards written so far."""
        self._closed = True
        self._pending = {}
        for tmp, _ in self._shards:
            tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardedSafetensorsWriter":
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
