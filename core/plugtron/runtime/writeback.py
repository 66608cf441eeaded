"""Starting a file's disk writes while it is still being written (Linux ``sync_file_range``).

A file that must be on disk when the command ends is ``fsync``ed after its
last byte (a megatron checkpoint's ``.distcp`` files: the conversion promises
a checkpoint that survives a crash once it is published). Written first and
synced after, the disk sits idle while the CPU copies the bytes into the page
cache, then the CPU waits while the disk writes them all. Asking the kernel to
start writing each finished stretch (``SYNC_FILE_RANGE_WRITE``: start, do not
wait) overlaps the two, and the final ``fsync`` only waits for the tail.
Measured here (2-core VM, 1 GiB in 8 MiB writes, alternated): 0.45-0.47 s
written then synced, 0.28-0.39 s with a range started every 64 MiB.

It is a hint: the ``fsync`` stays, and where the call does not exist (another
OS) or fails, or the stream has no file descriptor, nothing happens.
"""

from __future__ import annotations

import ctypes
import sys
from typing import IO, Any, Callable

SYNC_FILE_RANGE_WRITE = 2
#: Bytes between two requests: large enough that the calls cost nothing, small enough to overlap most of a file.
EVERY = 64 << 20

_sync_file_range: Any = None


def _libc_sync_file_range() -> Any:
    global _sync_file_range
    if _sync_file_range is None:
        _sync_file_range = False
        if sys.platform.startswith("linux"):
            try:
                function = ctypes.CDLL(None, use_errno=True).sync_file_range
                function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
                _sync_file_range = function
            except (OSError, AttributeError):
                pass
    return _sync_file_range


class Writeback:
    """Call :meth:`progress` after writes to ``stream``; each ``every`` new bytes go to the disk in the background.

    ``start_range(fd, offset, length)`` is the kernel call; tests pass their own.
    """

    def __init__(self, stream: IO[bytes], every: int = EVERY,
                 start_range: Callable[[int, int, int], int] | None = None) -> None:
        self._stream, self._every, self._started = stream, every, 0
        self._start_range = start_range or _kernel_start_range()
        try:
            self._fd = stream.fileno()
            self._started = stream.tell()
        except (AttributeError, OSError, ValueError):  # an in-memory or remote stream: nothing to hint
            self._start_range = None

    def progress(self) -> None:
        if self._start_range is None:
            return
        position = self._stream.tell()
        if position - self._started < self._every:
            return
        self._stream.flush()  # the bytes must have reached the kernel to be written out
        if self._start_range(self._fd, self._started, position - self._started) != 0:
            self._start_range = None  # refused once (an unsupported file system): refused every time
        self._started = position


def _kernel_start_range() -> Callable[[int, int, int], int] | None:
    function = _libc_sync_file_range()
    if not function:
        return None
    return lambda fd, offset, length: function(fd, offset, length, SYNC_FILE_RANGE_WRITE)
