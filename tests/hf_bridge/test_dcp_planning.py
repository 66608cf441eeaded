"""Distributed-checkpoint planning by bucket (plugtron_hf_bridge.dcp_planning) against torch's and megatron's own.

The planner must give torch's answers (the same reads, the same plan errors) and write the
files megatron's own path writes (same metadata, loadable by megatron's stock loader), with
work linear in a layer stack's chunks where torch's compares every pair.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.default_planner import _validate_global_plan
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, TensorProperties, TensorStorageMetadata
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from plugtron.sharding import unwrap
from plugtron_hf_bridge import dcp_planning
from plugtron_hf_bridge.checkpoint import WEIGHTS_DIR, bridge_meta, load_megatron, save_megatron
from plugtron_hf_bridge.dcp_metadata import read_metadata
from plugtron_hf_bridge.importer import import_hf


def _grid(shape: tuple[int, ...], splits: tuple[int, ...]) -> list[ChunkStorageMetadata]:
    """The chunks of ``shape`` cut into ``splits[d]`` equal pieces along each dimension d."""
    steps = [size // parts for size, parts in zip(shape, splits)]
    return [ChunkStorageMetadata(offsets=torch.Size(i * s for i, s in zip(index, steps)), sizes=torch.Size(steps))
            for index in itertools.product(*(range(parts) for parts in splits))]


def _stored(shape: tuple[int, ...], chunks: list[ChunkStorageMetadata]) -> TensorStorageMetadata:
    return TensorStorageMetadata(properties=TensorProperties(dtype=torch.float32), size=torch.Size(shape),
                                 chunks=chunks)


def _reads(items: list) -> set[tuple]:
    return {(tuple(i.dest_index.offset), tuple(i.dest_offsets), tuple(i.storage_index.offset),
             tuple(i.storage_offsets), tuple(i.lengths)) for i in items}


# Stacks of (layers, experts, rows, cols) saved at one layout and read at another: same layout, TP halves
# to quarters along rows, rows to columns, one rank holding everything, and a non-stacked 2-D tensor.
LAYOUTS = [
    ((3, 4, 8, 6), (3, 4, 1, 1), (3, 4, 1, 1)),
    ((3, 4, 8, 6), (3, 4, 2, 1), (3, 4, 4, 1)),
    ((3, 4, 8, 6), (3, 4, 2, 1), (3, 4, 1, 2)),
    ((3, 4, 8, 6), (3, 2, 2, 1), (3, 4, 1, 1)),
    ((2, 12, 6), (2, 3, 1), (2, 1, 2)),
    ((12, 6), (3, 1), (2, 3)),
]


@pytest.mark.parametrize("shape, saved_splits, local_splits", LAYOUTS)
def test_reads_are_torchs_reads(shape, saved_splits, local_splits) -> None:
    stored = _stored(shape, _grid(shape, saved_splits))
    local = _grid(shape, local_splits)
    ours = dcp_planning.read_items("w", stored, local)
    torchs = create_read_items_for_chunk_list("w", stored, local)
    assert _reads(ours) == _reads(torchs)
    assert len(ours) == len(torchs)
    covered = sum(torch.Size(i.lengths).numel() for i in ours)
    assert covered == torch.Size(shape).numel()  # every local element read exactly once


def test_read_planning_compares_only_chunks_of_the_same_layer_and_expert(monkeypatch) -> None:
    """12 layers x 64 experts: one comparison per chunk (torch's planner made 2.95M for such a checkpoint)."""
    calls = []
    monkeypatch.setattr(dcp_planning, "_overlap", lambda *a, real=dcp_planning._overlap: calls.append(1) or real(*a))
    shape = (12, 64, 8, 4)
    chunks = _grid(shape, (12, 64, 1, 1))
    assert len(dcp_planning.read_items("w", _stored(shape, chunks), chunks)) == 768
    assert len(calls) == 768


def _metadata(*tensors: tuple[str, tuple[int, ...], list[ChunkStorageMetadata]]) -> Metadata:
    return Metadata(state_dict_metadata={key: _stored(shape, chunks) for key, shape, chunks in tensors})


def _moved(chunk: ChunkStorageMetadata, dim: int, by: int) -> ChunkStorageMetadata:
    offsets = list(chunk.offsets)
    offsets[dim] += by
    return ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=chunk.sizes)


def test_plan_validation_agrees_with_torch() -> None:
    good = _grid((3, 4, 8, 6), (3, 4, 2, 1))
    overlapping = good[:-1] + [_moved(good[-2], 2, 2)]  # the last chunk half over its neighbour
    outside = good[:-1] + [_moved(good[-1], 3, 1)]  # one column past the end
    missing = good[:-1]  # a hole: found only when several ranks saved
    for chunks, plans in ((good, 2), (overlapping, 1), (outside, 1), (missing, 2), (missing, 1)):
        metadata = _metadata(("w", (3, 4, 8, 6), chunks), ("n", (12, 6), _grid((12, 6), (3, 2))))
        ours, torchs = dcp_planning.global_plan_errors(metadata, plans), _validate_global_plan([None] * plans, metadata)
        assert [e.split(" ")[0:3] for e in ours] == [e.split(" ")[0:3] for e in torchs], (ours, torchs)
    assert "overlapping chunks" in dcp_planning.global_plan_errors(
        _metadata(("w", (3, 4, 8, 6), overlapping)), 1)[0]


# -- the files: the same as megatron's own path writes, and each path reads the other's -------------------------------
@pytest.fixture(scope="module")
def moe_checkpoints(tmp_path_factory, pm, plugtron_single_rank) -> tuple[Path, Path, dict]:
    """A Qwen3-MoE model saved by plugtron (stacked planning) and by megatron's stock translation and planner."""
    from arch_cases import save_case
    from arch_cases.moe import QWEN3_MOE
    from megatron.core.dist_checkpointing.mapping import apply_factories
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner, _replace_state_dict_keys_with_sharded_keys, mcore_to_pyt_state_dict)
    from torch.distributed.checkpoint import FileSystemWriter, save

    base = tmp_path_factory.mktemp("dcp")
    imported = import_hf(save_case(base / "hf", QWEN3_MOE), pm=pm, parallel=plugtron_single_rank)
    plan = imported.plan
    ours = save_megatron(base / "ours", imported.built, plan.config,
                         meta=bridge_meta(plan.architecture, plan.hf_config, plan.config))
    stock = Path(shutil.copytree(ours, base / "stock"))
    shutil.rmtree(stock / WEIGHTS_DIR)
    shutil.copytree(ours / WEIGHTS_DIR, stock / WEIGHTS_DIR, ignore=shutil.ignore_patterns("*.distcp", ".metadata"))
    model = unwrap(imported.built.chunks[0])
    sharded = {"chunk0": model.sharded_state_dict()}
    apply_factories(sharded)  # as dist_checkpointing.save does before its strategy
    flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded, keep_only_main_replica=True)
    save(mcore_to_pyt_state_dict(flat, False), storage_writer=FileSystemWriter(stock / WEIGHTS_DIR, thread_count=1),
         planner=MCoreSavePlanner(dedup_replicated_tensors=False, flatten_state_dict=False))
    expected = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    return ours, stock, expected


def test_the_checkpoint_describes_the_chunks_megatrons_path_describes(moe_checkpoints) -> None:
    ours, stock, _ = moe_checkpoints
    mine, theirs = (read_metadata(path / WEIGHTS_DIR).state_dict_metadata for path in (ours, stock))
    assert mine == theirs
    experts = [v for k, v in mine.items() if "experts" in k and isinstance(v, TensorStorageMetadata)]
    # one chunk per expert on a prepended expert axis (linear_fc1: its gate and up halves apart)
    assert len(experts) == 6 and all(entry.size[0] == 4 and len(entry.chunks) in (4, 8) for entry in experts)


def _params(loaded) -> dict:
    return {k: v for k, v in unwrap(loaded.built.chunks[0]).state_dict().items() if isinstance(v, torch.Tensor)}


def test_each_path_reads_the_others_files_exactly(moe_checkpoints, pm, plugtron_single_rank) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

    ours, stock, expected = moe_checkpoints
    from_stock = _params(load_megatron(stock, pm=pm, parallel=plugtron_single_rank))
    assert all(torch.equal(from_stock[k], expected[k]) for k in expected)

    model = unwrap(load_megatron(stock, pm=pm, parallel=plugtron_single_rank).built.chunks[0])
    for param in model.parameters():
        param.data.zero_()
    loaded = dist_checkpointing.load(model.sharded_state_dict(), str(ours / WEIGHTS_DIR),
                                     sharded_strategy=TorchDistLoadShardedStrategy())
    model.load_state_dict(loaded, strict=True)
    state = model.state_dict()
    assert all(torch.equal(state[k], expected[k]) for k in expected)


@pytest.mark.parametrize("durable", [False, True], ids=["buffered", "synced-direct"])
def test_records_written_from_templates_are_torchs_bytes(tmp_path, plugtron_single_rank, durable) -> None:
    """The writer's template records (dcp_writer.RecordTemplates) against torch's own writer, same state dict;
    synced files are written around the page cache (plugtron.runtime.direct_write), with the same bytes."""
    from torch.distributed.checkpoint import FileSystemWriter, save

    from plugtron_hf_bridge.dcp_strategies import _without_crc32
    from plugtron_hf_bridge.dcp_writer import ViewSafeFileSystemWriter

    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    state = {"bf16": torch.randn(5, 7, generator=g).bfloat16(), "scalar": torch.tensor(1.5),
             "empty": torch.zeros(0, 3), "ints": torch.arange(12).view(3, 4), "mask": torch.rand(9, generator=g) > 0.5,
             "rows": base[2:4], "columns": base[:, 1:3], "again": torch.randn(5, 7, generator=g).bfloat16(),
             "large": torch.randn(64, 48, generator=g), "large_bf16": torch.randn(3, 4096, generator=g).bfloat16()}
    written, ours = {}, ViewSafeFileSystemWriter(tmp_path / "ours", sync_files=durable)
    for name, writer in (("torch", FileSystemWriter(tmp_path / "torch", single_file_per_rank=True, thread_count=1)),
                         ("ours", ours)):
        with _without_crc32():
            save(state, storage_writer=writer)
        [shard] = (tmp_path / name).glob("*.distcp")
        written[name] = shard.read_bytes()
    assert written["ours"] == written["torch"]
    # every record came from a template (the two bf16 (5, 7) tensors share one; the large ones are cut by their write)
    assert len(ours.templates) == 9
