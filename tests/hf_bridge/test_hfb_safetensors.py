"""SafetensorsCheckpoint / ShardedSafetensorsWriter / atomic_output_dir."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from plugtron._atomic import atomic_output_dir
from plugtron.errors import OutputError
from plugtron_hf_bridge.errors import CheckpointFormatError, TensorNotFoundError
from plugtron_hf_bridge.safetensors_io import (
    INDEX_FILE,
    SINGLE_FILE,
    SafetensorsCheckpoint,
    ShardedSafetensorsWriter,
    read_header,
)

from hfb_helpers import record_shard_writers


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.f32": torch.randn(6, 5, generator=g),
        "b.bf16": torch.randn(7, 3, generator=g).to(torch.bfloat16),
        "c.f16": torch.randn(4, 4, 2, generator=g).to(torch.float16),
        "d.i64": torch.randint(-5, 5, (9,), generator=g),
        "e.u8": torch.randint(0, 255, (3, 2), generator=g).to(torch.uint8),
        "f.bool": torch.rand(5, generator=g) > 0.5,
        "g.f64": torch.randn(2, 3, generator=g, dtype=torch.float64),
        "h.scalar": torch.tensor(3.5),
    }


def write(directory: Path, tensors: dict[str, torch.Tensor], **kwargs) -> None:
    with ShardedSafetensorsWriter(directory, **kwargs) as writer:
        for name, t in tensors.items():
            writer.add(name, t)


def assert_same(ckpt: SafetensorsCheckpoint, tensors: dict[str, torch.Tensor]) -> None:
    assert ckpt.names() == sorted(tensors)
    for name, t in tensors.items():
        assert ckpt.shape(name) == tuple(t.shape)
        assert ckpt.dtype(name) == t.dtype
        got = ckpt.read(name)
        assert got.dtype == t.dtype and torch.equal(got, t), name


def test_single_file_round_trip(tmp_path: Path) -> None:
    tensors = sample_tensors()
    write(tmp_path, tensors)
    assert sorted(p.name for p in tmp_path.iterdir()) == [SINGLE_FILE]
    with SafetensorsCheckpoint(tmp_path) as ckpt:
        assert_same(ckpt, tensors)
        assert all(ckpt.file_of(n) == tmp_path / SINGLE_FILE for n in tensors)


def test_sharded_round_trip(tmp_path: Path) -> None:
    tensors = sample_tensors()
    write(tmp_path, tensors, max_shard_bytes=64)
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    n = len(shards)
    assert n > 2
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not list(tmp_path.glob(".tmp*")) and not (tmp_path / SINGLE_FILE).exists()
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == set(shards)
    with SafetensorsCheckpoint(tmp_path) as ckpt:
        assert_same(ckpt, tensors)
        for name, fname in index["weight_map"].items():
            assert ckpt.file_of(name) == tmp_path / fname
    for shard in shards:  # every shard keeps the metadata transformers expects
        from safetensors import safe_open

        with safe_open(str(tmp_path / shard), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}


def test_shards_switched_to_direct_writes_mid_file_keep_their_bytes(tmp_path: Path, monkeypatch) -> None:
    """plugtron.runtime.adaptive_write judging every 4 KiB window slow: shards written partly buffered, partly
    direct (unaligned switch points, a strided tensor through the staging buffer) read back bit-exact."""
    from plugtron.runtime import adaptive_write, direct_write
    from plugtron_hf_bridge.safetensors_write import Rows

    try:
        os.close(os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | direct_write._O_DIRECT))
    except OSError:
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT")
    switched = []
    real_switch = adaptive_write.set_direct
    monkeypatch.setattr(adaptive_write, "set_direct", lambda fd, on: (switched.append(fd), real_switch(fd, on))[1])
    monkeypatch.setattr(adaptive_write, "WINDOW", 256)
    monkeypatch.setattr(adaptive_write, "SLOW_SECONDS_PER_GB", -1.0)
    (tmp_path / "probe").unlink()
    g = torch.Generator().manual_seed(1)
    tensors = {**sample_tensors(), "big": torch.randn(300, 77, generator=g), "strided": torch.randn(90, 64, generator=g).t()}
    parts = (torch.randn(5, 33, generator=g), torch.randn(8, 33, generator=g))
    with ShardedSafetensorsWriter(tmp_path, max_shard_bytes=60_000) as writer:
        for name, t in tensors.items():
            writer.add(name, t)
        writer.add("rows", Rows(parts))
    assert len(switched) >= 2  # the larger shards switched part-way (the last, small one may not)
    with SafetensorsCheckpoint(tmp_path) as ckpt:
        assert_same(ckpt, {**tensors, "rows": torch.cat(parts)})


def test_shard_limit_respected_and_big_tensor_gets_own_shard(tmp_path: Path) -> None:
    tensors = {f"t{i}": torch.full((10,), float(i)) for i in range(6)}  # 40 bytes each
    tensors["big"] = torch.zeros(100)  # 400 bytes > limit
    write(tmp_path, tensors, max_shard_bytes=100)
    for shard in tmp_path.glob("*.safetensors"):
        infos = read_header(shard)
        size = sum(torch.empty(i.shape, dtype=i.dtype).nbytes for i in infos.values())
        assert size <= 100 or list(infos) == ["big"]


@pytest.mark.parametrize("sharded", [False, True])
def test_read_slice_matches_full_slicing(tmp_path: Path, sharded: bool) -> None:
    g = torch.Generator().manual_seed(1)
    tensors = {"w": torch.randn(12, 10, generator=g).to(torch.bfloat16), "v": torch.randn(5, 6, 7, generator=g)}
    write(tmp_path, tensors, max_shard_bytes=64 if sharded else 2**30)
    with SafetensorsCheckpoint(tmp_path) as ckpt:
        for name, t in tensors.items():
            for dim in range(t.dim()):
                for start, stop in [(0, 1), (1, 3), (0, t.shape[dim]), (2, 2)]:
                    got = ckpt.read_slice(name, dim, start, stop)
                    assert torch.equal(got, t.narrow(dim, start, stop - start)), (name, dim, start, stop)
            assert torch.equal(ckpt.read_slice(name, -1, 1, 3), t.narrow(-1, 1, 2))
        with pytest.raises(CheckpointFormatError, match="'w'.*slice 3:13"):
            ckpt.read_slice("w", 0, 3, 13)
        with pytest.raises(CheckpointFormatError, match="dim 2"):
            ckpt.read_slice("w", 2, 0, 1)


@pytest.mark.parametrize("cut", [1, 100, "header"])
def test_truncated_file_is_reported_with_its_name(tmp_path: Path, cut) -> None:
    write(tmp_path, {"x": torch.randn(64, 8), "y": torch.randn(64, 8)})
    path = tmp_path / SINGLE_FILE
    data = path.read_bytes()
    path.write_bytes(data[:20] if cut == "header" else data[:-cut])
    with pytest.raises(CheckpointFormatError, match="truncated") as info:
        SafetensorsCheckpoint(tmp_path)
    assert str(path) in str(info.value)


def test_truncated_shard_is_reported_eagerly(tmp_path: Path) -> None:
    write(tmp_path, {f"t{i}": torch.randn(16) for i in range(4)}, max_shard_bytes=64)
    last = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    last.write_bytes(last.read_bytes()[:-4])
    with pytest.raises(CheckpointFormatError, match="truncated") as info:
        SafetensorsCheckpoint(tmp_path)
    assert last.name in str(info.value)


def test_garbage_header_is_reported(tmp_path: Path) -> None:
    (tmp_path / SINGLE_FILE).write_bytes((16).to_bytes(8, "little") + b"{not json at all")
    with pytest.raises(CheckpointFormatError, match="not valid JSON"):
        SafetensorsCheckpoint(tmp_path)


def test_pickle_only_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"never unpickled")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointFormatError, match="only safetensors") as info:
        SafetensorsCheckpoint(tmp_path)
    assert "pytorch_model.bin" in str(info.value)


def test_empty_or_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointFormatError, match="no model.safetensors"):
        SafetensorsCheckpoint(tmp_path)
    with pytest.raises(CheckpointFormatError, match="does not exist"):
        SafetensorsCheckpoint(tmp_path / "nope")


def test_unknown_tensor_name_names_tensor_and_directory(tmp_path: Path) -> None:
    write(tmp_path, {"x": torch.zeros(2)})
    with SafetensorsCheckpoint(tmp_path) as ckpt:
        for call in (ckpt.read, ckpt.shape, ckpt.dtype, ckpt.file_of):
            with pytest.raises(TensorNotFoundError) as info:
                call("model.missing.weight")
            assert "model.missing.weight" in str(info.value) and str(tmp_path) in str(info.value)
        with pytest.raises(KeyError):
            ckpt.read("other")
        assert "x" in ckpt and "other" not in ckpt


def test_index_problems_are_reported(tmp_path: Path) -> None:
    write(tmp_path, {f"t{i}": torch.randn(16) for i in range(3)}, max_shard_bytes=64)
    index_path = tmp_path / INDEX_FILE
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost"] = index["weight_map"]["t0"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointFormatError, match="'ghost'"):
        SafetensorsCheckpoint(tmp_path)
    index["weight_map"]["ghost"] = "model-00009-of-00009.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointFormatError, match="missing") as info:
        SafetensorsCheckpoint(tmp_path)
    assert "model-00009-of-00009.safetensors" in str(info.value)
    index["weight_map"]["ghost"] = "../elsewhere.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointFormatError, match="plain file name"):
        SafetensorsCheckpoint(tmp_path)


def test_handles_reopen_after_close(tmp_path: Path) -> None:
    write(tmp_path, {"x": torch.arange(4.0)})
    ckpt = SafetensorsCheckpoint(tmp_path)
    assert torch.equal(ckpt.read("x"), torch.arange(4.0))
    ckpt.close()
    ckpt.close()  # idempotent
    assert torch.equal(ckpt.read("x"), torch.arange(4.0))
    ckpt.close()


def test_writer_rejects_duplicates_and_keeps_tied_tensors(tmp_path: Path) -> None:
    shared = torch.randn(4, 3)
    with ShardedSafetensorsWriter(tmp_path) as writer:
        writer.add("emb", shared)
        writer.add("head", shared)  # same storage: must still be writable
        writer.add("view", shared[1:3])  # view of a bigger storage
        with pytest.raises(CheckpointFormatError, match="'emb' was added twice"):
            writer.add("emb", torch.zeros(1))
    with SafetensorsCheckpoint(tmp_path) as ckpt:
        assert torch.equal(ckpt.read("head"), shared) and torch.equal(ckpt.read("view"), shared[1:3])


def test_writer_refuses_dirty_directory_and_cleans_up_on_error(tmp_path: Path) -> None:
    write(tmp_path / "a", {"x": torch.zeros(3)})
    with pytest.raises(CheckpointFormatError, match="already holds"):
        ShardedSafetensorsWriter(tmp_path / "a")
    out = tmp_path / "b"
    with pytest.raises(RuntimeError):
        with ShardedSafetensorsWriter(out, max_shard_bytes=8) as writer:
            for i in range(4):
                writer.add(f"t{i}", torch.zeros(4))
            raise RuntimeError("boom")
    assert list(out.iterdir()) == []
    with pytest.raises(CheckpointFormatError, match="no tensors"):
        ShardedSafetensorsWriter(tmp_path / "c").close()


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("tensors_after", [0, 3])
def test_a_failed_shard_write_is_raised_and_leaves_nothing(tmp_path: Path, tensors_after: int, overlap: bool) -> None:
    """A shard's write fails (complex64: no safetensors dtype), in the background or in the caller's thread:
    close() or the next shard raises it, and every shard file is gone."""
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="cannot store dtype complex64"):
        with ShardedSafetensorsWriter(out, max_shard_bytes=16, overlap=overlap) as writer:
            writer.add("ok", torch.zeros(4))
            writer.add("bad", torch.zeros(2, dtype=torch.complex64))
            for i in range(tensors_after):
                writer.add(f"t{i}", torch.zeros(4))
    assert list(out.iterdir()) == []


def test_the_caller_fills_the_next_shard_while_one_is_written(tmp_path: Path, monkeypatch) -> None:
    """add() returns while the full shard is still being written; close() waits for it."""
    import threading

    from plugtron_hf_bridge import safetensors_io

    release, started = threading.Event(), threading.Event()
    real = safetensors_io.write_file

    def slow_first(path, tensors, metadata):
        if not started.is_set():
            started.set()
            assert release.wait(10)
        real(path, tensors, metadata)

    monkeypatch.setattr(safetensors_io, "write_file", slow_first)
    tensors = {f"t{i}": torch.full((4,), float(i)) for i in range(3)}
    with ShardedSafetensorsWriter(tmp_path / "out", max_shard_bytes=16) as writer:
        writer.add("t0", tensors["t0"])
        writer.add("t1", tensors["t1"])  # shard 1 (t0) goes to the writer thread, which blocks
        assert started.wait(10)  # reached only because add() returned (written in line, it would wait on release)
        release.set()
        writer.add("t2", tensors["t2"])
    with SafetensorsCheckpoint(tmp_path / "out") as ckpt:
        assert_same(ckpt, tensors)


@pytest.mark.parametrize("overlap", [True, False])
def test_shards_are_written_in_the_callers_thread_unless_overlapping(tmp_path: Path, monkeypatch, overlap: bool) -> None:
    """overlap=False: every shard in the caller's thread; overlap=True: all but the last in the writer thread."""
    import threading


    writers = record_shard_writers(monkeypatch)
    tensors = {f"t{i}": torch.full((4,), float(i)) for i in range(3)}
    with ShardedSafetensorsWriter(tmp_path / "out", max_shard_bytes=16, overlap=overlap) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
    caller = threading.current_thread().name
    assert writers[-1] == caller and len(writers) == 3
    assert all((name != caller) == overlap for name in writers[:-1]), writers
    with SafetensorsCheckpoint(tmp_path / "out") as ckpt:
        assert_same(ckpt, tensors)


def test_atomic_output_dir_success_and_failure(tmp_path: Path) -> None:
    dst = tmp_path / "out"
    with pytest.raises(ValueError, match="boom"):
        with atomic_output_dir(dst) as tmp:
            assert tmp.parent == tmp_path and tmp.is_dir()
            (tmp / "partial.safetensors").write_bytes(b"x")
            raise ValueError("boom")
    assert list(tmp_path.iterdir()) == []  # no dst, no leftover temp dir
    with atomic_output_dir(dst) as tmp:
        (tmp / "f").write_text("new")
    assert (dst / "f").read_text() == "new" and sorted(tmp_path.iterdir()) == [dst]


def test_atomic_output_dir_refuses_existing_destination(tmp_path: Path) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep").write_text("old")
    ran = False
    with pytest.raises(OutputError, match="already exists") as info:
        with atomic_output_dir(dst):
            ran = True
    assert not ran and str(dst) in str(info.value)
    assert (dst / "keep").read_text() == "old" and sorted(tmp_path.iterdir()) == [dst]


def test_atomic_output_dir_overwrite(tmp_path: Path) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(dst, overwrite=True) as tmp:
            (tmp / "f").write_text("new")
            raise KeyboardInterrupt
    assert (dst / "keep").read_text() == "old" and sorted(tmp_path.iterdir()) == [dst]
    with atomic_output_dir(dst, overwrite=True) as tmp:
        (tmp / "f").write_text("new")
    assert sorted(p.name for p in dst.iterdir()) == ["f"] and sorted(tmp_path.iterdir()) == [dst]
