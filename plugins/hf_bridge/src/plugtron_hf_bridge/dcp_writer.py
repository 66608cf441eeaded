"""torch's distributed-checkpoint file writer, without a fresh copy of every tensor that is a view.

``torch.save`` of a view writes its whole storage, so torch's writer clones
each view first and keeps every clone until its file is closed. megatron
saves a gated MLP's ``linear_fc1`` as two views (gate and up halves), so a
250M Llama cloned 184 MB of fresh memory per save (0.14 s of a 0.65 s first
save here; first touches of new memory are what cost on this machine's VM).

:class:`ViewSafeFileSystemWriter` writes the same files, record by record in
the same order with torch's own ``_write_item`` (one ``torch.save`` archive per
tensor, ``fsync`` at the end of each file), but hands ``torch.save`` a
contiguous view as a tensor whose storage is exactly the view's memory (no
copy); only a strided view is copied, into a buffer kept per byte size and
reused for the next one of that size (the bytes are written before the buffer
is reused: this loop, not torch's, decides the order). One thread, as the
strategy always asked for.

Each record is written from a template (:class:`RecordTemplates`): the bytes
``torch.save`` writes around a tensor's data depend only on its dtype, shape
and strides (the strategy turns zip CRCs off, the one field that depends on
the data), so they are made once per kind of tensor by ``torch.save`` itself
and each record is those bytes, the tensor's memory, and those bytes again.
The file is byte for byte what torch's writer writes (tested); the per-record
cost of ``torch.save`` (a pickler, a zip writer, some 24 small writes) was
0.7 s of a 2.5 s write for the 2,400 records of a 1B Qwen3-MoE.

A file that is to be synced is written around the page cache where the file
system allows it (:func:`plugtron.runtime.direct_write.open_durable`: its bytes
must reach the disk anyway, and on this VM finding page-cache pages was most of
the write's cost), else buffered and ``fsync``ed at the end.
"""

from __future__ import annotations

import io
import os
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import SerializationFormat, _split_by_size_and_type, _StorageInfo, _write_item
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from plugtron.runtime.direct_write import open_durable

from .safetensors_write import byte_view


class ViewSafeFileSystemWriter(FileSystemWriter):
    """``FileSystemWriter(single_file_per_rank=True, thread_count=1)`` whose views reuse one buffer per size."""

    def __init__(self, path: str | os.PathLike, *, sync_files: bool = True) -> None:
        super().__init__(path, single_file_per_rank=True, sync_files=sync_files, thread_count=1)
        self.templates = RecordTemplates()

    def write_data(self, plan: Any, planner: Any) -> Future:
        [bucket] = _split_by_size_and_type(1, plan.items)
        name = f"{plan.storage_data.prefix}0.distcp"
        results = self._write_file(self.fs.concat_path(self.path, name), name, bucket, planner)
        done: Future = Future()
        done.set_result(results)
        return done

    def _write_file(self, path: Any, name: str, items: list[Any], planner: Any) -> list[Any]:
        """Byte items first, then tensors, as torch's writer orders a file."""
        staging: dict[int, torch.Tensor] = {}
        results = []
        with open_durable(path) if self.sync_files else self.fs.create_stream(path, "wb") as stream:
            for item in [i for i in items if i.type == WriteItemType.BYTE_IO]:
                results.append(self._write(stream, planner.resolve_data(item), item, name))
            for item in [i for i in items if i.type != WriteItemType.BYTE_IO]:
                results.append(self._write(stream, _minimal(planner.resolve_data(item), staging), item, name))
        return results

    def _write(self, stream: io.IOBase, data: Any, item: Any, name: str) -> Any:
        around = None
        if isinstance(data, torch.Tensor) and not self.transforms.extensions \
                and self.serialization_format == SerializationFormat.TORCH_SAVE:
            around = self.templates.around(data)
        if around is None:
            return _write_item(self.transforms, stream, data, item, name, self.serialization_format)
        offset = stream.tell()
        stream.write(around[0])
        if data.numel():
            stream.write(byte_view(data).numpy())
        stream.write(around[1])
        length = stream.tell() - offset
        return WriteResult(index=item.index, size_in_bytes=length, storage_data=_StorageInfo(name, offset, length))


class RecordTemplates:
    """The bytes ``torch.save`` writes before and after a tensor's data, made once per dtype, shape and strides.

    Only for tensors whose storage is exactly their contiguous bytes (what the
    writer hands over, see :func:`_minimal`) and with zip CRCs off (the
    strategy's ``_without_crc32``); otherwise :meth:`around` returns None and
    the record goes through ``torch.save``.
    """

    def __init__(self) -> None:
        self._made: dict[tuple, tuple[bytes, bytes] | None] = {}

    def __len__(self) -> int:
        """How many kinds of tensor have a usable template."""
        return sum(made is not None for made in self._made.values())

    def around(self, tensor: torch.Tensor) -> tuple[bytes, bytes] | None:
        if not tensor.is_contiguous() or tensor.storage_offset() or tensor.untyped_storage().nbytes() != tensor.nbytes:
            return None
        if torch.serialization.get_crc32_options():
            return None
        key = (tensor.dtype, tuple(tensor.shape))
        if key not in self._made:
            self._made[key] = _template(tensor.dtype, tuple(tensor.shape))
        return self._made[key]


def _template(dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[bytes, bytes] | None:
    """``torch.save``'s bytes before and after the data of a tensor of this kind (None if they cannot be told apart).

    A tensor of at least :data:`_SINK_FROM` bytes is saved into :class:`_Sink`, which keeps every
    write but the data itself (one write of exactly the tensor's size; the archive's other writes
    are a few hundred bytes at most): no copy of the data, and the probe's memory is never touched.
    A smaller one is saved into memory and cut where :func:`.dcp_direct.layout` finds its data.
    """
    from . import dcp_direct

    probe = torch.empty(shape, dtype=dtype)
    if probe.nbytes >= _SINK_FROM:
        sink = _Sink(probe.nbytes)
        torch.save(probe, sink)
        return sink.around()
    probe.zero_()
    buffer = io.BytesIO()
    torch.save(probe, buffer)
    record = buffer.getvalue()
    found = dcp_direct.layout(io.BytesIO(record), 0, len(record))
    if found is None or found.shape != shape or found.dtype != str(dtype).removeprefix("torch."):
        return None
    start, end = found.start, found.start + probe.nbytes
    return record[:start], record[end:]


#: Tensors this large are cut by their one data write (:class:`_Sink`).
_SINK_FROM = 4096


class _Sink(io.RawIOBase):
    """A write-only file that keeps every write except the one of exactly ``data_bytes`` bytes."""

    def __init__(self, data_bytes: int) -> None:
        super().__init__()
        self.data_bytes, self.parts, self.cut, self.at = data_bytes, [], [], 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes
        if size == self.data_bytes:
            self.cut.append(len(self.parts))
        else:
            self.parts.append(bytes(data))
        self.at += size
        return size

    def tell(self) -> int:
        return self.at

    def around(self) -> tuple[bytes, bytes] | None:
        if len(self.cut) != 1:
            return None
        return b"".join(self.parts[:self.cut[0]]), b"".join(self.parts[self.cut[0]:])


def _minimal(tensor: torch.Tensor, staging: dict[int, torch.Tensor]) -> torch.Tensor:
    """``tensor`` on the CPU with a storage of exactly its bytes: itself, an alias of its bytes, or a staged copy."""
    tensor = tensor.detach().cpu()
    if tensor.untyped_storage().size() == tensor.nbytes:
        return tensor
    if tensor.is_contiguous() and tensor.element_size() in _SAME_SIZE_INTS:
        return _alias(tensor)
    buffer = staging.get(tensor.nbytes)
    if buffer is None:
        buffer = staging[tensor.nbytes] = torch.empty(tensor.nbytes, dtype=torch.uint8)
    out = buffer.view(tensor.dtype).view(tensor.shape)
    out.copy_(tensor)
    return out


#: Element size -> an integer dtype numpy knows (numpy has no bfloat16).
_SAME_SIZE_INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _alias(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor on the same memory as a contiguous view, whose storage is just that memory (no copy).

    Through numpy: ``torch.from_numpy`` of the view's array makes a storage of
    exactly the array's bytes, kept alive by the array, which keeps the
    parameter alive. The gate and up halves of megatron's ``linear_fc1`` take
    this path: 0.34 s of copying at 1B when they were staged.
    """
    flat = tensor.reshape(-1).view(_SAME_SIZE_INTS[tensor.element_size()])
    return torch.from_numpy(flat.numpy()).view(tensor.dtype).view(tensor.shape)
