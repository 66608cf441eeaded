"""plugtron.runtime.adaptive_write: buffered while cheap, direct once a window is slow; the bytes never change."""

from __future__ import annotations

import errno
import fcntl
import os

import pytest

from plugtron.runtime import adaptive_write, direct_write
from plugtron.runtime.adaptive_write import open_adaptive
from plugtron.runtime.direct_write import ALIGN


def _pieces(sizes: list[int]) -> list[bytes]:
    return [bytes((start * 7 + i) % 253 for i in range(size)) for start, size in enumerate(sizes)]


SIZES = [5, 3 * ALIGN + 1, 17, 2 * ALIGN - 3, 9 * ALIGN + 11, 1]


def _write(path, pieces, **options):
    with open_adaptive(path, **options) as stream:
        for piece in pieces:
            assert stream.write(piece) == len(piece)
        assert stream.tell() == sum(map(len, pieces))
    return stream


def test_cheap_windows_stay_in_the_page_cache(tmp_path) -> None:
    pieces = _pieces(SIZES)
    stream = _write(tmp_path / "out.bin", pieces, window=ALIGN, slow_seconds_per_gb=float("inf"))
    assert not stream.direct and stream.closed
    assert (tmp_path / "out.bin").read_bytes() == b"".join(pieces)


def test_a_slow_window_switches_to_direct_writes_mid_file(tmp_path) -> None:
    """Every window judged slow (a negative limit): the switch lands at an unaligned position, the bytes stay."""
    _skip_without_o_direct(tmp_path)
    pieces = _pieces(SIZES)
    stream = _write(tmp_path / "out.bin", pieces, window=2 * ALIGN, slow_seconds_per_gb=-1.0)
    assert stream.direct
    assert (tmp_path / "out.bin").read_bytes() == b"".join(pieces)


def test_one_slow_window_alone_does_not_switch(tmp_path, monkeypatch) -> None:
    """A lone expensive window happens with pages at hand too; two in a row switch."""
    _skip_without_o_direct(tmp_path)
    clock: list[float] = []
    for cost in (1.0, 0.0, 1.0, 0.0, 1.0, 1.0):  # kernel seconds of each one-byte write (1 s/byte: slow)
        start = clock[-1] if clock else 0.0
        clock += [start, start + cost]
    ticks = iter(clock)
    monkeypatch.setattr(adaptive_write.time, "thread_time", lambda: next(ticks))
    with open_adaptive(tmp_path / "out.bin", window=1, slow_seconds_per_gb=1e6) as stream:
        for index, byte in enumerate(b"abcde"):
            stream.write(bytes([byte]))
            assert not stream.direct, index
        stream.write(b"f")
        assert stream.direct
    assert (tmp_path / "out.bin").read_bytes() == b"abcdef"


def _skip_without_o_direct(directory) -> None:
    try:
        os.close(os.open(directory / "probe", os.O_WRONLY | os.O_CREAT | direct_write._O_DIRECT))
    except OSError:
        pytest.skip(f"the file system of {directory} refuses O_DIRECT")


def test_a_file_system_without_o_direct_keeps_writing_buffered(tmp_path, monkeypatch) -> None:
    """Faked refusal (every file system here takes the flag): F_SETFL with O_DIRECT fails with EINVAL."""
    real = fcntl.fcntl

    def refuse(fd, command, *args):
        if command == fcntl.F_SETFL and args and args[0] & direct_write._O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, command, *args)

    monkeypatch.setattr(fcntl, "fcntl", refuse)
    pieces = _pieces(SIZES)
    stream = _write(tmp_path / "out.bin", pieces, window=ALIGN, slow_seconds_per_gb=-1.0)
    assert not stream.direct
    assert (tmp_path / "out.bin").read_bytes() == b"".join(pieces)


def test_opting_out_of_direct_writes_is_honoured(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PLUGTRON_DIRECT_WRITES", "0")
    stream = _write(tmp_path / "out.bin", _pieces(SIZES), window=ALIGN, slow_seconds_per_gb=-1.0)
    assert not stream.direct


@pytest.mark.parametrize("slow", [False, True], ids=["buffered", "switched"])
@pytest.mark.parametrize("sync", [False, True])
def test_sync_only_when_asked(tmp_path, monkeypatch, sync, slow) -> None:
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    pieces = _pieces(SIZES)
    _write(tmp_path / "out.bin", pieces, sync=sync, window=ALIGN, slow_seconds_per_gb=-1.0 if slow else float("inf"))
    assert len(synced) == int(sync)
    assert (tmp_path / "out.bin").read_bytes() == b"".join(pieces)
