"""Reading and writing HF-style safetensors checkpoints, safely and in bounded memory.

Why not just ``safetensors.torch.load_file``?

- Pickle checkpoints (``*.bin``, ``*.pt``) can run arbitrary code when loaded,
  so this module refuses them outright instead of silently falling back.
- ``safe_open`` memory-maps lazily: a truncated download is only noticed when a
  tensor near the end is touched, possibly hours into a conversion.  We parse
  every header ourselves up front and check it against the file size
  (:mod:`.safetensors_header`, which needs no torch).
- Converting a 70B model must not hold the whole model in memory: the reader
  serves single tensors or row/column ranges (for tensor-parallel shards), and
  the writer flushes a shard file as soon as it reaches its size limit.
- A crashed export must never leave a half-written directory that looks like a
  checkpoint: :func:`plugtron._atomic.atomic_output_dir` publishes a directory only on success.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open

from .errors import CheckpointFormatError, ConversionError
from .safetensors_header import (  # noqa: F401 - re-exported: the names callers know
    _MAX_HEADER_BYTES, DTYPES, INDEX_FILE, PICKLE_SUFFIXES, SINGLE_FILE, HeaderEntry, SafetensorsIndex, read_entries,
)
from .safetensors_write import Rows, Writable, nbytes, write_file


class TensorInfo(NamedTuple):
    """What a safetensors header says about one tensor."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    #: Absolute byte offset of the tensor's data in ``file`` (for direct reads).
    offset: int = -1


def _torch_info(entry: HeaderEntry) -> TensorInfo:
    return TensorInfo(getattr(torch, entry.dtype_name), entry.shape, entry.file, entry.offset)


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header without reading any tensor data (see
    :func:`.safetensors_header.read_entries` for every check); dtypes as torch dtypes."""
    return {name: _torch_info(entry) for name, entry in read_entries(path).items()}


class SafetensorsCheckpoint(SafetensorsIndex):
    """Lazy, validated read access to a ``model.safetensors`` or sharded HF checkpoint.

    All headers are checked at construction (:class:`.safetensors_header.SafetensorsIndex`);
    file handles are opened on first use and kept until :meth:`close` (or the end of a ``with`` block).
    """

    def __init__(self, directory: str | Path) -> None:
        super().__init__(directory)
        self._handles: dict[Path, Any] = {}
        self._torch_infos: dict[str, TensorInfo] = {}

    def info(self, name: str) -> TensorInfo:
        """dtype, shape, file and data offset of ``name`` (from the validated header)."""
        info = self._torch_infos.get(name)
        if info is None:
            info = self._torch_infos[name] = _torch_info(self.entry(name))
        return info

    def dtype(self, name: str) -> torch.dtype:
        return self.info(name).dtype

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
        info = self.info(name)
        return self._handle(info.file).get_tensor(name)

    def read_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows/columns ``start:stop`` of ``name`` along ``dim``; only those bytes are read."""
        info = self.info(name)
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
    the current shard's tensors and the shard being written are held, by
    reference: a tensor may be a view of a model parameter or
    :class:`~.safetensors_write.Rows` of such views, and its bytes are copied
    nowhere but into the file (:func:`~.safetensors_write.write_file`).

    With ``overlap`` (the default) a full shard is written by one background
    thread while the caller goes on producing the next (a file write releases
    the GIL): an export whose tensors arrive from other ranks receives them
    while the previous shard goes to disk (1B MoE at EP=2: rank 0 spent 4 s
    writing and 1 s waiting on receives, one after the other). At most one
    shard is in flight, so the tensors held stay under two shards' worth; an
    error in the writer is raised when the next shard starts, or by
    :meth:`close`. The last shard is written by :meth:`close` itself (nothing
    is left to overlap it), so a one-shard checkpoint starts no thread.

    ``overlap=False`` writes every shard in the caller's thread. For a caller
    whose tensors cost nothing to produce (views of a model at hand) the
    thread has nothing to overlap, and it costs: a second busy thread runs on
    the other core, whose page allocator may be the slow one. On this VM the
    250M export's first call took 0.12-0.49 s with the thread and 0.12 s
    without it, five fresh processes each (``benchmarks/README.md``).
    """

    def __init__(
        self, directory: str | Path, max_shard_bytes: int = 5 * 2**30, metadata: dict[str, str] | None = None,
        *, overlap: bool = True,
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
        self._pending: dict[str, Writable] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._seen: set[str] = set()
        self._total_bytes = 0
        self._closed = False
        self._writing: Any = None  # the Future of the shard being written
        self._thread: Any = None
        self._overlap = overlap

    def add(self, name: str, tensor: "torch.Tensor | Rows") -> None:
        """Queue ``tensor`` under ``name``; flushes the current shard first if it would overflow.

        The tensor is kept by reference until its shard is flushed: do not modify it in place meanwhile.
        Tied or overlapping tensors are fine: each name gets its own copy of the bytes in the file.
        """
        if self._closed:
            raise ConversionError(f"writer for {self.directory} is closed; cannot add tensor '{name}'")
        if name in self._seen:
            raise CheckpointFormatError(self.directory, f"tensor '{name}' was added twice")
        if isinstance(tensor, Rows):
            tensor = Rows(tuple(part.detach().to("cpu") for part in tensor.parts))
        else:
            tensor = tensor.detach().to("cpu")
        size = nbytes(tensor)
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor
        self._seen.add(name)
        self._pending_bytes += size
        self._total_bytes += size

    def _flush(self, *, in_background: bool = True) -> None:
        """Write the pending shard: in the writer thread, or here (the last one, which nothing would overlap)."""
        from concurrent.futures import ThreadPoolExecutor

        self._wait()
        path = self.directory / f".tmp-shard-{len(self._shards) + 1:05d}.safetensors"
        self._shards.append((path, list(self._pending)))  # listed first: abort() removes a half-written one too
        pending, self._pending, self._pending_bytes = self._pending, {}, 0
        if not (in_background and self._overlap):
            write_file(path, pending, self.metadata)
            return
        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="safetensors-writer")
        self._writing = self._thread.submit(write_file, path, pending, self.metadata)

    def _wait(self) -> None:
        """Let the shard in flight finish; its error, if any, is raised here."""
        writing, self._writing = self._writing, None
        if writing is not None:
            writing.result()

    def _stop(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None

    def close(self) -> None:
        """Write the last shard, give shards their final names and write the index if sharded."""
        if self._closed:
            return
        try:
            if self._pending:
                self._flush(in_background=False)
            self._wait()
        finally:
            self._stop()
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
        try:
            self._wait()  # never delete a file another thread is still writing
        except Exception:  # already failing: the original error is the one to report
            pass
        finally:
            self._stop()
        for tmp, _ in self._shards:
            tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardedSafetensorsWriter":
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.close()
        except BaseException:  # a shard that failed to write: no other shard may stay behind either
            self.abort()
            raise
