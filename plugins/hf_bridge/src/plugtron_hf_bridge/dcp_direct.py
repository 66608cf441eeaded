"""Reading a torch_dist tensor straight into the parameter it loads, when its record is the plain kind.

torch's ``FileSystemReader`` loads every tensor of a checkpoint with
``torch.load`` into a new tensor, then copies the part the rank needs into
the parameter. Each byte is read into fresh memory and copied once more, and
a rank that needs half a tensor (a different tensor-parallel layout) reads all
of it. Fresh memory is the expensive part on this machine's VM.

Each tensor in a ``.distcp`` file is one ``torch.save`` archive: an
uncompressed zip whose ``data.pkl`` rebuilds a tensor from one storage record
(``data/0``). :func:`read_into` recognises that plain kind (checked here by
reading the zip's directory and ``data.pkl`` with an unpickler that builds
nothing, only records what ``torch._utils._rebuild_tensor_v2`` would be
given) and, when the block the rank needs is one contiguous byte range of the
stored tensor and the destination is contiguous, reads that range straight
into the destination (``preadv``); a column slice of whole
rows (a row-parallel weight read at a higher tensor-parallel size) goes row
block by row block through one reused buffer. Anything else (another record
layout, another block shape, an unexpected global, any parse error) returns
False and the caller takes torch's own path, which reports what is wrong with
a bad file.
"""

from __future__ import annotations

import io
import math
import pickle
import struct
import zipfile
from typing import Any, BinaryIO, NamedTuple

#: Typed-storage class name in a ``torch.save`` pickle -> (dtype name, bytes per element).
STORAGES = {
    "DoubleStorage": ("float64", 8), "FloatStorage": ("float32", 4), "HalfStorage": ("float16", 2),
    "BFloat16Storage": ("bfloat16", 2), "LongStorage": ("int64", 8), "IntStorage": ("int32", 4),
    "ShortStorage": ("int16", 2), "CharStorage": ("int8", 1), "ByteStorage": ("uint8", 1), "BoolStorage": ("bool", 1),
}
_ITEMSIZE = dict(STORAGES.values())
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... file name length, extra field length
_MAX_PICKLE_BYTES = 1 << 16


class Layout(NamedTuple):
    """A stored tensor: its dtype, shape, and the absolute file offset of its first byte."""

    dtype: str
    shape: tuple[int, ...]
    start: int

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self.dtype]


class _Decline(Exception):
    """Not the plain kind: the caller falls back to torch's reader."""


def layout(handle: BinaryIO, offset: int, length: int) -> Layout | None:
    """The layout of the ``torch.save`` archive at ``offset`` (``length`` bytes), or None if it is not the plain kind."""
    try:
        return _layout(_Window(handle, offset, length))
    except Exception:  # noqa: BLE001 - any surprise means "not the plain kind": torch's reader reports it
        return None


def _layout(window: "_Window") -> Layout:
    archive = zipfile.ZipFile(window)
    members = {info.filename: info for info in archive.infolist()}
    if any(info.compress_type != zipfile.ZIP_STORED for info in members.values()):
        raise _Decline
    pickles = [name for name in members if name.endswith("/data.pkl")]
    if len(pickles) != 1 or members[pickles[0]].file_size > _MAX_PICKLE_BYTES:
        raise _Decline
    prefix = pickles[0][: -len("data.pkl")]
    window.seek(_member(window, members[pickles[0]]))
    raw = window.read(members[pickles[0]].file_size)
    key, dtype, numel, shape = _RecordingUnpickler(io.BytesIO(raw)).tensor()
    record = members.get(f"{prefix}data/{key}")
    if record is None or record.file_size != numel * _ITEMSIZE[dtype] or math.prod(shape) != numel:
        raise _Decline
    return Layout(dtype, shape, window.offset + _member(window, record))


def _member(window: "_Window", info: zipfile.ZipInfo) -> int:
    """Offset in the record of a stored member's bytes, from its local header (read directly: the writer may
    leave the zip's CRC fields at zero, which torch.load accepts and ``ZipFile.read`` does not)."""
    window.seek(info.header_offset)
    signature, name_length, extra_length = _LOCAL_HEADER.unpack(window.read(_LOCAL_HEADER.size))
    if signature != b"PK\x03\x04":
        raise _Decline
    start = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
    if start + info.file_size > window.length:
        raise _Decline
    return start


class Layouts:
    """:func:`layout` for the records of one file, parsing each distinct record frame once.

    Why: parsing a record (its zip directory, local headers and ``data.pkl``)
    took about 170 us, 0.4 s for the 2,391 records of a 1B MoE checkpoint, and
    the records of one dtype and shape are the same bytes around different
    data. The parse is a function of the bytes it reads; when none of those
    lay inside the tensor's data, a record of the same length whose bytes
    outside its data equal the parsed one's has the same layout, found with
    two short reads and a comparison. A frame whose parse read any data byte
    is never reused, so a crafted record cannot pass as a cached one.
    """

    _PER_LENGTH = 8

    def __init__(self) -> None:
        self._frames: dict[int, list[tuple[bytes, bytes, Layout]]] = {}

    def get(self, handle: BinaryIO, offset: int, length: int) -> Layout | None:
        frames = self._frames.setdefault(length, [])
        for head, tail, relative in frames:
            if _read_at(handle, offset, len(head)) == head and _read_at(handle, offset + length - len(tail),
                                                                        len(tail)) == tail:
                return relative._replace(start=offset + relative.start)
        window = _Window(handle, offset, length)
        try:
            found = _layout(window)
        except Exception:  # noqa: BLE001 - as in layout()
            return None
        start, end = found.start - offset, found.start - offset + math.prod(found.shape) * found.itemsize
        if len(frames) < self._PER_LENGTH and all(stop <= start or begin >= end for begin, stop in window.spans):
            frames.append((_read_at(handle, offset, start), _read_at(handle, offset + end, length - end),
                           found._replace(start=start)))
        return found


def _read_at(handle: BinaryIO, start: int, size: int) -> bytes:
    handle.seek(start)
    return handle.read(size)


class _Window(io.RawIOBase):
    """``length`` bytes of ``handle`` from ``offset``, as a seekable file of their own (what zipfile reads)."""

    def __init__(self, handle: BinaryIO, offset: int, length: int) -> None:
        super().__init__()
        self.handle, self.offset, self.length, self.at = handle, offset, length, 0
        self.spans: list[tuple[int, int]] = []  # every byte range read, for Layouts

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.at

    def seek(self, position: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.at, io.SEEK_END: self.length}[whence]
        self.at = min(max(base + position, 0), self.length)
        return self.at

    def readinto(self, buffer: Any) -> int:
        size = min(len(buffer), self.length - self.at)
        if size <= 0:
            return 0
        self.handle.seek(self.offset + self.at)
        got = self.handle.readinto(memoryview(buffer)[:size]) or 0
        self.spans.append((self.at, self.at + got))
        self.at += got
        return got


class _RecordingUnpickler(pickle.Unpickler):
    """Reads a one-tensor ``data.pkl``: records the arguments of ``_rebuild_tensor_v2``, builds nothing."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuilt
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch" and name in STORAGES:
            return STORAGES[name][0]
        raise _Decline

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and pid[3] == "cpu"):
            raise _Decline
        _, dtype, key, _, numel = pid
        if dtype not in _ITEMSIZE or not isinstance(key, str) or not isinstance(numel, int):
            raise _Decline
        return ("storage", dtype, key, numel)

    def tensor(self) -> tuple[str, str, int, tuple[int, ...]]:
        """(storage key, dtype, storage elements, shape) of a contiguous tensor starting at the storage's start."""
        result = self.load()
        if not (isinstance(result, tuple) and result and result[0] == "tensor"):
            raise _Decline
        _, (_, dtype, key, numel), shape = result
        return key, dtype, numel, shape


def _rebuilt(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any,
             *metadata: Any) -> tuple:
    if not (isinstance(storage, tuple) and storage_offset == 0 and isinstance(size, tuple) and isinstance(stride, tuple)):
        raise _Decline
    if not all(isinstance(v, int) and v >= 0 for v in size + stride) or stride != _row_major(size):
        raise _Decline
    return ("tensor", storage, size)


def _row_major(size: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for dim in reversed(size):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


def _span(shape: tuple[int, ...], offsets: tuple[int, ...], lengths: tuple[int, ...]) -> tuple[int, int] | None:
    """(first element, element count) of a block of a row-major tensor, when the block is contiguous in it."""
    if len(offsets) != len(shape) or len(lengths) != len(shape):
        return None
    if any(o < 0 or n < 0 or o + n > s for o, n, s in zip(offsets, lengths, shape)):
        return None
    cut = [d for d in range(len(shape)) if offsets[d] != 0 or lengths[d] != shape[d]]
    # contiguous: dims before the first cut have length 1, dims after it are whole
    if cut and (any(lengths[d] != 1 for d in range(cut[0])) or cut[1:]):
        return None
    return sum(o * s for o, s in zip(offsets, _row_major(shape))), math.prod(lengths)


def byte_range(found: Layout, offsets: tuple[int, ...], lengths: tuple[int, ...]) -> tuple[int, int] | None:
    """Absolute (start, length) of the block ``offsets:offsets+lengths`` when it is contiguous in the stored tensor."""
    span = _span(found.shape, offsets, lengths)
    if span is None:
        return None
    return found.start + span[0] * found.itemsize, span[1] * found.itemsize


class Staging:
    """One reusable buffer for the rows of a column slice (bounded: :data:`STAGING_BYTES`)."""

    def __init__(self) -> None:
        self.buffer: Any = None

    def take(self, size: int) -> Any:
        import torch

        if self.buffer is None or self.buffer.numel() < size:
            self.buffer = torch.empty(max(size, STAGING_BYTES), dtype=torch.uint8)
        return self.buffer[:size]


STAGING_BYTES = 16 * 2**20


def read_into(handle: BinaryIO, found: Layout, offsets: tuple[int, ...], lengths: tuple[int, ...], target: Any,
              staging: Staging | None = None) -> bool:
    """Read the block into ``target`` (contiguous, same dtype and shape); False when it cannot be done directly.

    A block that is contiguous in the file is read straight into ``target``; a
    column slice of contiguous rows (a row-parallel weight read at a higher
    tensor-parallel size) is read row block by row block through ``staging``.
    """
    import torch

    if not target.is_contiguous() or target.dtype != getattr(torch, found.dtype) \
            or tuple(target.shape) != tuple(lengths) or target.device.type != "cpu":
        return False
    span = byte_range(found, offsets, lengths)
    if span is not None:
        from .safetensors_write import byte_view

        _read_exactly(handle, span[0], byte_view(target))
        return True
    if staging is None or len(found.shape) < 2:
        return False
    rows = _span(found.shape[:-1], offsets[:-1], lengths[:-1])
    if rows is None:
        return False
    _read_columns(handle, found, rows, (offsets[-1], lengths[-1]), target, staging)
    return True


def _read_columns(handle: BinaryIO, found: Layout, rows: tuple[int, int], columns: tuple[int, int], target: Any,
                  staging: Staging) -> None:
    import torch

    width = found.shape[-1]
    row_bytes = width * found.itemsize
    first, count = rows
    out = target.view(count, columns[1])
    step = max(1, STAGING_BYTES // max(row_bytes, 1))
    for done in range(0, count, step):
        n = min(step, count - done)
        block = staging.take(n * row_bytes)
        _read_exactly(handle, found.start + (first + done) * row_bytes, block)
        stored = block.view(getattr(torch, found.dtype)).view(n, width)
        out[done:done + n].copy_(stored[:, columns[0]:columns[0] + columns[1]])


def _read_exactly(handle: BinaryIO, start: int, out: Any) -> None:
    """Copy ``out.numel()`` bytes of the file from ``start`` into the uint8 tensor ``out`` (committed memory).

    Read by the kernel straight into ``out`` (:func:`.region_io.pread_into`,
    which says why and what it was measured against); a file that ends early
    is an error, never a SIGBUS.
    """
    from .region_io import pread_into

    size = out.numel()
    if size and pread_into(handle, start, memoryview(out.numpy())) < size:
        raise EOFError(f"file ended before byte {start + size}")
