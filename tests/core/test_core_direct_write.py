"""plugtron.runtime.direct_write: durable files written around the page cache, byte for byte."""

from __future__ import annotations

import errno
import fcntl
import os

import pytest

from plugtron.runtime import direct_write
from plugtron.runtime.direct_write import ALIGN, BufferedDurable, DirectFile, open_durable


def _pieces(sizes: list[int]) -> list[bytes]:
    return [bytes((start + i) % 251 for i in range(size)) for start, size in enumerate(sizes)]


def _direct(path) -> DirectFile:
    stream = open_durable(path)
    if not isinstance(stream, DirectFile):
        stream.abort()
        pytest.skip(f"the file system of {path} refuses O_DIRECT")
    return stream


@pytest.mark.parametrize("sizes", [[], [1], [ALIGN], [3 * ALIGN - 5, 7, 2 * ALIGN + 1], [5 * ALIGN + 3] * 4,
                                   [1] * 3000 + [9 * ALIGN]])
def test_direct_file_writes_exactly_the_bytes_given(tmp_path, sizes) -> None:
    """Writes smaller and larger than a staging buffer, across its edges; the padding of the last is cut off."""
    path = tmp_path / "out.bin"
    pieces = _pieces(sizes)
    stream = _direct(path)
    stream.close()
    with DirectFile(os.open(path, os.O_WRONLY | os.O_TRUNC | direct_write._O_DIRECT), str(path),
                    chunk=2 * ALIGN) as stream:
        for piece in pieces:
            assert stream.write(memoryview(piece)) == len(piece)
        assert stream.tell() == sum(sizes)
    assert stream.closed
    assert path.read_bytes() == b"".join(pieces)


def test_direct_file_takes_numpy_and_tensor_bytes(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    values = torch.arange(100_000, dtype=torch.float32)
    with _direct(tmp_path / "out.bin") as stream:
        stream.write(b"head")
        stream.write(values.view(torch.uint8).numpy())
    data = (tmp_path / "out.bin").read_bytes()
    assert data[:4] == b"head"
    assert torch.equal(torch.frombuffer(bytearray(data[4:]), dtype=torch.float32), values)


def test_a_file_system_that_refuses_direct_writes_gets_them_without_the_flag(tmp_path, monkeypatch) -> None:
    """Some file systems open with O_DIRECT and refuse the write (EINVAL): the flag is dropped, nothing is lost.

    Faked: no file system here refuses; the fake refuses while the flag is set, as such a one does.
    """
    real_pwrite, refused = os.pwrite, []

    def pwrite(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & direct_write._O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(direct_write.os, "pwrite", pwrite)
    pieces = _pieces([3 * ALIGN + 11, 17])
    path = tmp_path / "out.bin"
    with _direct(path) as stream:
        for piece in pieces:
            stream.write(piece)
    assert refused == [0]
    assert path.read_bytes() == b"".join(pieces)


def test_a_failed_disk_write_is_raised_and_the_file_closed(tmp_path, monkeypatch) -> None:
    """ENOSPC in the writer thread: raised by close (or the next buffer), never swallowed; the descriptor is closed."""
    def pwrite(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    stream = _direct(tmp_path / "out.bin")
    monkeypatch.setattr(direct_write.os, "pwrite", pwrite)
    stream.write(b"x" * 10)
    with pytest.raises(OSError, match="No space left"):
        stream.close()
    assert stream.closed
    with pytest.raises(OSError):
        os.fstat(stream.fileno())


def test_an_error_while_writing_aborts_without_syncing(tmp_path, monkeypatch) -> None:
    synced = []
    monkeypatch.setattr(direct_write.os, "fsync", synced.append)
    with pytest.raises(RuntimeError, match="producer failed"):
        with _direct(tmp_path / "out.bin") as stream:
            stream.write(b"x" * (3 * ALIGN))
            raise RuntimeError("producer failed")
    assert stream.closed and synced == []


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_without_o_direct_the_file_is_buffered_and_synced(tmp_path, monkeypatch, how) -> None:
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(direct_write.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    if how == "environment":
        monkeypatch.setenv("PLUGTRON_DIRECT_WRITES", "0")
    with open_durable(tmp_path / "out.bin", direct=how != "argument") as stream:
        assert isinstance(stream, BufferedDurable)
        stream.write(b"abc")
        stream.write(memoryview(b"defg"))
        assert stream.tell() == 7
    assert (tmp_path / "out.bin").read_bytes() == b"abcdefg"
    assert len(synced) == 1


def test_chunks_must_be_aligned(tmp_path) -> None:
    fd = os.open(tmp_path / "out.bin", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(ValueError, match="multiple of 4096"):
            DirectFile(fd, "out.bin", chunk=ALIGN + 1)
    finally:
        os.close(fd)
