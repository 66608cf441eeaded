"""Read rectangular regions of safetensors tensors with plain file reads.

Why not ``safe_open(...).get_slice``? It memory-maps the file, and every page
it touches stays in the process's resident set (as file-backed memory) until
the handle closes: importing a model that way peaks at about twice the
checkpoint size. Here bytes go from the page cache straight into the
destination parameter (``readinto`` on its memory) whenever the region is a
run of whole rows in the parameter's dtype, and through a bounded temporary
buffer otherwise (column ranges, transposes, dtype changes). Headers were
validated by :class:`~plugtron_hf_bridge.safetensors_io.SafetensorsCheckpoint`,
so offsets are trusted; a short read still raises, naming file and tensor.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import IO

import torch

from .errors import CheckpointFormatError, MappingError
from .safetensors_io import SafetensorsCheckpoint, TensorInfo

Span = tuple[int, int]
_CHUNK_BYTES = 64 * 2**20  # bound on the temporary buffer for column reads


class RegionReader:
    """Region reads from one checkpoint; keeps one unbuffered handle per file until :meth:`close`."""

    def __init__(self, checkpoint: SafetensorsCheckpoint, chunk_bytes: int = _CHUNK_BYTES) -> None:
        self.checkpoint = checkpoint
        self.chunk_bytes = chunk_bytes
        self.bytes_read = 0
        self._files: dict[Path, IO[bytes]] = {}

    def close(self) -> None:
        files, self._files = self._files, {}
        for handle in files.values():
            handle.close()

    def __enter__(self) -> "RegionReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public -----------------------------------------------------------------------------------
    def read(self, name: str, rows: Span | None = None, cols: Span | None = None) -> torch.Tensor:
        """Rows ``rows`` (and columns ``cols`` of a 2-D tensor) of ``name``, in the stored dtype."""
        info = self.checkpoint.info(name)
        rows = rows or (0, info.shape[0] if info.shape else 1)
        out = torch.empty(_region_shape(info, rows, cols), dtype=info.dtype)
        self.read_into(name, out, rows, cols)
        return out

    def read_into(self, name: str, out: torch.Tensor, rows: Span, cols: Span | None = None,
                  *, transpose: bool = False) -> None:
        """Copy the region into ``out`` (transposed first if asked); casts to ``out.dtype``."""
        info = self.checkpoint.info(name)
        shape = _region_shape(info, rows, cols)
        want = shape[::-1] if transpose else shape
        if tuple(out.shape) != tuple(want):
            raise MappingError(name, f"region rows {rows} cols {cols} has shape {shape}; the destination is {tuple(out.shape)}")
        if math.prod(shape) == 0:
            return
        if cols is not None and (cols[0] > 0 or cols[1] < info.shape[1]):
            self._read_columns(info, name, rows, cols, out, transpose)
        elif not transpose and out.dtype == info.dtype and out.is_contiguous():
            self._read_rows(info, name, rows[0], out)
        else:
            temp = torch.empty(shape, dtype=info.dtype)
            self._read_rows(info, name, rows[0], temp)
            out.copy_(temp.t() if transpose else temp)

    # -- internals --------------------------------------------------------------------------------
    def _handle(self, path: Path) -> IO[bytes]:
        handle = self._files.get(path)
        if handle is None:
            try:
                handle = open(path, "rb", buffering=0)  # noqa: SIM115 - closed in close()
            except OSError as exc:
                raise CheckpointFormatError(path, f"cannot open: {exc}") from exc
            self._files[path] = handle
        return handle

    def _read_rows(self, info: TensorInfo, name: str, first_row: int, out: torch.Tensor) -> None:
        """Whole rows starting at ``first_row`` into contiguous ``out`` of the stored dtype."""
        row_bytes = math.prod(info.shape[1:]) * out.element_size()
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        handle = self._handle(info.file)
        handle.seek(info.offset + first_row * row_bytes)
        done = 0
        while done < len(view):
            got = handle.readinto(view[done:])
            if not got:
                raise CheckpointFormatError(info.file, f"tensor '{name}': file ended early (read {done} of {len(view)} bytes)")
            done += got
        self.bytes_read += done

    def _read_columns(self, info: TensorInfo, name: str, rows: Span, cols: Span, out: torch.Tensor,
                      transpose: bool) -> None:
        """Columns of a 2-D tensor, a block of whole rows at a time through a bounded buffer."""
        row_bytes = info.shape[1] * torch.empty((), dtype=info.dtype).element_size()
        block = max(1, self.chunk_bytes // max(row_bytes, 1))
        for start in range(rows[0], rows[1], block):
            stop = min(rows[1], start + block)
            temp = torch.empty((stop - start, info.shape[1]), dtype=info.dtype)
            self._read_rows(info, name, start, temp)
            part = temp[:, cols[0]:cols[1]]
            lo, hi = start - rows[0], stop - rows[0]
            if transpose:
                out[:, lo:hi].copy_(part.t())
            else:
                out[lo:hi].copy_(part)


def _region_shape(info: TensorInfo, rows: Span, cols: Span | None) -> tuple[int, ...]:
    shape = info.shape
    if not shape:
        return ()
    if not 0 <= rows[0] <= rows[1] <= shape[0]:
        raise CheckpointFormatError(info.file, f"rows {rows} are outside the shape {shape}")
    if cols is None:
        return (rows[1] - rows[0], *shape[1:])
    if len(shape) != 2 or not 0 <= cols[0] <= cols[1] <= shape[1]:
        raise CheckpointFormatError(info.file, f"columns {cols} do not fit the shape {shape}")
    return (rows[1] - rows[0], cols[1] - cols[0])
