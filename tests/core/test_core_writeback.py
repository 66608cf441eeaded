"""Starting a file's disk writes while it is written: ranges asked for, bytes unchanged, streams without a descriptor."""

from __future__ import annotations

import io
from pathlib import Path

from plugtron.runtime.writeback import EVERY, Writeback


def _write(path: Path, chunks: list[bytes], every: int, calls: list) -> None:
    with open(path, "wb") as stream:
        writeback = Writeback(stream, every=every, start_range=lambda fd, at, n: calls.append((at, n)) or 0)
        for chunk in chunks:
            stream.write(chunk)
            writeback.progress()


def test_each_stretch_is_handed_to_the_kernel_once_in_order_and_the_bytes_are_unchanged(tmp_path) -> None:
    chunks = [bytes([i]) * size for i, size in enumerate([300, 500, 100, 900, 50])]
    calls: list = []
    _write(tmp_path / "f", chunks, every=700, calls=calls)
    assert calls == [(0, 800), (800, 1000)]  # after 800 bytes, after 1800; the last 50 are left to the fsync
    assert (tmp_path / "f").read_bytes() == b"".join(chunks)


def test_the_real_kernel_call_leaves_the_file_as_written(tmp_path) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB, in 64 KiB writes with a range every 128 KiB
    with open(tmp_path / "f", "wb") as stream:
        writeback = Writeback(stream, every=128 << 10)
        for at in range(0, len(data), 64 << 10):
            stream.write(data[at:at + (64 << 10)])
            writeback.progress()
    assert (tmp_path / "f").read_bytes() == data and EVERY >= 1 << 20


def test_a_refused_call_is_not_asked_again_and_an_in_memory_stream_is_left_alone(tmp_path) -> None:
    calls: list = []
    with open(tmp_path / "f", "wb") as stream:
        writeback = Writeback(stream, every=10, start_range=lambda fd, at, n: calls.append(at) or -1)
        for _ in range(3):
            stream.write(b"x" * 20)
            writeback.progress()
    assert calls == [0]
    memory = io.BytesIO()
    writeback = Writeback(memory, every=1, start_range=lambda *args: calls.append("memory") or 0)
    memory.write(b"abc")
    writeback.progress()
    assert calls == [0] and memory.getvalue() == b"abc"
