"""Writing a file that must be on disk when we are done, around the page cache (Linux ``O_DIRECT``).

Why: a megatron checkpoint is ``fsync``ed (a published conversion must survive
a crash), so every byte goes to the disk before the command ends anyway. Written
the usual way, each byte is first copied into a page of the page cache, pages the
kernel must find, fill and then write back. Measured on this 2-core VM (1 GB in
8 MiB writes, fresh processes, alternating, two rounds): buffered then ``fsync``
0.44-0.86 s; buffered with each 64 MiB handed to the disk as it was written
(``sync_file_range``, what this package did before) 1.73-1.76 s, nearly all of
it system time; ``O_DIRECT`` from reused page-aligned buffers 0.36-0.38 s, 0.05 s
of it system time. Writing around the page cache also leaves a conversion's
output out of memory that other work needs.

:class:`DirectFile` is a write-only stream: bytes are copied into page-aligned
staging buffers (``O_DIRECT`` needs aligned memory, offsets and lengths; a
tensor's storage is not page-aligned), each full buffer is written by one
background thread while the next fills, the last one is padded to the block
size, and :meth:`~DirectFile.close` cuts the file to its real length and
``fsync``s it.

Where ``O_DIRECT`` is refused (a file system without it, or another OS), or
``PLUGTRON_DIRECT_WRITES=0`` is set, :func:`open_durable` returns
:class:`BufferedDurable`, an ordinary buffered file ``fsync``ed on close: the
same promise, the page cache's speed.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any, TypeVar

#: Bytes per staging buffer (and per disk write); measured here: 4-8 MiB writes ran at 2.4 GB/s, 16-64 MiB at 1.6-1.9.
CHUNK = 8 << 20
#: Staging buffers: one filling while the others are written.
BUFFERS = 3
#: ``PLUGTRON_DIRECT_WRITES=0`` writes through the page cache instead (a file system where ``O_DIRECT`` is slow).
OPT_OUT = "PLUGTRON_DIRECT_WRITES"
#: ``O_DIRECT`` lengths and offsets are multiples of this (the largest logical block size in use; 512 is common).
ALIGN = 4096


_Stream = TypeVar("_Stream", bound="_Finished")


class _Finished:
    """``with`` support for the streams below: closed (finished) on success, aborted on an error."""

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self: _Stream) -> _Stream:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class DirectFile(_Finished):
    """A write-only, ``fsync``-on-close file written with ``O_DIRECT`` (see the module docstring)."""

    def __init__(self, fd: int, path: str, chunk: int = CHUNK, buffers: int = BUFFERS, *, sync: bool = True) -> None:
        if chunk % ALIGN or buffers < 2:
            raise ValueError(f"chunk must be a multiple of {ALIGN} and buffers >= 2, got {chunk}, {buffers}")
        self.name, self._fd, self._chunk, self._sync = path, fd, chunk, sync
        self._buffers = [_take_buffer(chunk) for _ in range(buffers)]  # page-aligned, reused across files
        self._in_flight: list[Future | None] = [None] * buffers
        self._current, self._filled, self._file_offset, self._position = 0, 0, 0, 0
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="direct-write")
        self.closed = False

    # -- the stream interface torch's checkpoint writer uses ----------------------------------------
    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        size, done = len(view), 0
        while done < size:
            take = min(size - done, self._chunk - self._filled)
            self._buffers[self._current][self._filled:self._filled + take] = view[done:done + take]
            self._filled += take
            done += take
            if self._filled == self._chunk:
                self._submit(self._chunk)
        self._position += size
        return size

    def tell(self) -> int:
        return self._position

    def flush(self) -> None:
        """Nothing to do: bytes short of a full buffer are written by :meth:`close`."""

    def fileno(self) -> int:
        return self._fd

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        """Write the tail, cut the file to its length, ``fsync`` it (unless made with ``sync=False``) and close it."""
        if self.closed:
            return
        try:
            if self._filled:
                self._submit(-(-self._filled // ALIGN) * ALIGN)  # the padding is cut off below
            self._wait_all()
            os.ftruncate(self._fd, self._position)
            if self._sync:
                os.fsync(self._fd)
        finally:
            self._release()

    def abort(self) -> None:
        """Stop without finishing the file (the caller removes it); waits for writes in flight."""
        if not self.closed:
            try:
                self._wait_all()
            except OSError:
                pass
            finally:
                self._release()

    # -- staging ------------------------------------------------------------------------------------
    def _submit(self, length: int) -> None:
        """Hand the current buffer's first ``length`` bytes to the writer thread; take the next free buffer."""
        index = self._current
        self._in_flight[index] = self._writer.submit(_write_all, self._fd, self._buffers[index], length,
                                                     self._file_offset)
        self._file_offset += length
        self._current = (index + 1) % len(self._buffers)
        self._filled = 0
        self._wait(self._current)  # the buffer about to be filled must be on disk first

    def _wait(self, index: int) -> None:
        future, self._in_flight[index] = self._in_flight[index], None
        if future is not None:
            future.result()

    def _wait_all(self) -> None:
        for index in range(len(self._buffers)):
            self._wait(index)

    def _release(self) -> None:
        self.closed = True
        self._writer.shutdown(wait=True)
        os.close(self._fd)
        for buffer in self._buffers:
            _give_back(buffer)
        self._buffers = []


#: Staging buffers of closed files, kept for the next: a new mapping's pages are fresh memory, which is
#: what costs on this VM (3 new 8 MiB buffers per file made a 3-file 490 MB write 0.27-0.30 s).
_spare: list[mmap.mmap] = []
_spare_lock = threading.Lock()
#: Spare buffers kept at most (one file's worth, plus one being written by another thread).
MAX_SPARE = 2 * BUFFERS


def _take_buffer(size: int) -> mmap.mmap:
    with _spare_lock:
        for index, buffer in enumerate(_spare):
            if len(buffer) == size:
                return _spare.pop(index)
    return mmap.mmap(-1, size)


def _give_back(buffer: mmap.mmap) -> None:
    with _spare_lock:
        if len(_spare) < MAX_SPARE:
            _spare.append(buffer)
            return
    buffer.close()


def _write_all(fd: int, buffer: mmap.mmap, length: int, offset: int) -> None:
    """``pwrite`` all of it; a file system that refuses ``O_DIRECT`` writes gets them without the flag."""
    view = memoryview(buffer)[:length]
    try:
        while view:
            try:
                written = os.pwrite(fd, view, offset)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not set_direct(fd, False):  # False: not set, so the error is real
                    raise
                continue
            view, offset = view[written:], offset + written
    finally:
        view.release()


_O_DIRECT = getattr(os, "O_DIRECT", 0)


def direct_allowed() -> bool:
    """Whether this OS has ``O_DIRECT`` and ``PLUGTRON_DIRECT_WRITES=0`` does not turn it off."""
    return bool(_O_DIRECT) and os.environ.get(OPT_OUT, "1") != "0"


def set_direct(fd: int, on: bool) -> bool:
    """Set or clear ``O_DIRECT`` on an open ``fd`` (Linux allows both); False when it already was so, or when the
    file system refuses the flag."""
    import fcntl

    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if bool(flags & _O_DIRECT) == on:
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags ^ _O_DIRECT)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return False
    return True


def open_durable(path: str | os.PathLike, *, direct: bool = True) -> IO[bytes] | DirectFile:
    """A new file at ``path`` for writing, on disk once closed: a :class:`DirectFile` where the file system
    takes ``O_DIRECT``, else :class:`BufferedDurable` (buffered, ``fsync``ed on close)."""
    path = os.fspath(path)
    if direct and direct_allowed():
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_DIRECT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
        else:
            return DirectFile(fd, path)
    return BufferedDurable(path)


class BufferedDurable(_Finished):
    """The fallback of :func:`open_durable`: a buffered file, ``fsync``ed on close."""

    def __init__(self, path: str) -> None:
        self.name = path
        self._file = open(path, "wb")  # noqa: SIM115 - closed by close()

    def write(self, data: Any) -> int:
        return self._file.write(data)

    def tell(self) -> int:
        return self._file.tell()

    def flush(self) -> None:
        self._file.flush()

    def fileno(self) -> int:
        return self._file.fileno()

    def writable(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return self._file.closed

    def close(self) -> None:
        if self._file.closed:
            return
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()

    def abort(self) -> None:
        self._file.close()
