"""Writing through the page cache while its pages come cheap, around it (``O_DIRECT``) once they do not.

Why: a file nobody promised to sync (an HF export, as ``save_pretrained``
writes it) is fastest written into the page cache when the kernel has pages
at hand: 470 MB in 0.11 s here, against 0.29-0.35 s for the same bytes
written around the cache. But on this VM, whose freed memory goes back to the
host at once (``virtio_balloon`` free page reporting), a fresh process often
gets pages the host must back first, and the same write then costs 1.8-2.2 s
of system time per GB (traced: same pages allocated, 8x the kernel time), so
a 2 GB export took 2.3-4 s where a direct write takes 0.8 s. Which case a
process meets varies from process to process and over time, even within one
file (measured: a 2 GB write whose 16 MiB stretches turned slow after 13-27
of 80); what decides it was not pinned down.

:class:`AdaptiveFile` measures instead of guessing: it writes plainly and
times the kernel's share of each :data:`WINDOW` (the thread's CPU time, which
a descheduled thread does not inflate); two windows in a row that cost more
than :data:`SLOW_SECONDS_PER_GB` switch the file to ``O_DIRECT`` from there on
(:class:`.direct_write.DirectFile`, the last partial block rewritten from the
cache so that every direct write is aligned). Each file judges for itself:
the state changes as memory is freed and taken back. Where the file system
refuses ``O_DIRECT`` the file simply stays buffered.
"""

from __future__ import annotations

import os
import time
from typing import Any

from .direct_write import ALIGN, DirectFile, direct_allowed, set_direct

#: Bytes written plainly between two looks at what they cost (a slow window costs ~0.03 s more than a direct one).
WINDOW = 16 << 20
#: Kernel CPU seconds per GB above which page-cache writes are slower than direct ones here
#: (measured: 0.2 per GB with pages at hand, 1.8-2.2 when the host must back them; direct ~0.4 wall).
SLOW_SECONDS_PER_GB = 0.6


class AdaptiveFile(DirectFile):
    """A write-only file, buffered while that is cheap and direct after (see the module docstring).

    Closed as any :class:`DirectFile`: a file still written plainly has no staged tail, and cutting it to
    its length changes nothing.
    """

    def __init__(self, fd: int, path: str, *, sync: bool = False, window: int | None = None,
                 slow_seconds_per_gb: float | None = None) -> None:
        """``window`` and ``slow_seconds_per_gb`` default to :data:`WINDOW` and :data:`SLOW_SECONDS_PER_GB`."""
        super().__init__(fd, path, sync=sync)
        self._window = WINDOW if window is None else window
        limit = SLOW_SECONDS_PER_GB if slow_seconds_per_gb is None else slow_seconds_per_gb
        self._slow_seconds_per_byte = limit / 1e9
        self._plain = True
        self._window_bytes, self._window_cpu = 0, 0.0
        self._previous_slow = False

    @property
    def direct(self) -> bool:
        """Whether the file is being written around the page cache now."""
        return not self._plain

    def write(self, data: Any) -> int:
        if not self._plain:
            return super().write(data)
        view = memoryview(data).cast("B")
        started = time.thread_time()
        done = 0
        while done < len(view):
            done += os.write(self._fd, view[done:])
        self._window_cpu += time.thread_time() - started
        self._window_bytes += len(view)
        self._position += len(view)
        if self._window_bytes >= self._window:
            self._judge_window()
        return len(view)

    def _judge_window(self) -> None:
        """Two slow windows in a row switch: with pages at hand a lone window still costs 2+ s/GB now and then
        (measured: 2-3 of ~50 windows of a 2 GB write), while a host backing fresh pages makes every window slow."""
        slow = self._window_cpu > self._slow_seconds_per_byte * self._window_bytes
        self._window_bytes, self._window_cpu = 0, 0.0
        if slow and self._previous_slow:
            self._go_direct()
        self._previous_slow = slow

    def _go_direct(self) -> None:
        """From here on ``O_DIRECT``: the bytes since the last aligned offset are written again, aligned."""
        if not direct_allowed():
            return
        aligned = self._position - self._position % ALIGN
        tail = os.pread(self._fd, self._position - aligned, aligned)  # before the flag: a direct read needs alignment
        if not set_direct(self._fd, True):
            return
        self._plain, self._file_offset, self._position = False, aligned, aligned
        super().write(tail)


def open_adaptive(path: str | os.PathLike, **options: Any) -> AdaptiveFile:
    """A new file at ``path`` for writing (see :class:`AdaptiveFile` for ``options``)."""
    path = os.fspath(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)  # RDWR: see _go_direct
    return AdaptiveFile(fd, path, **options)
