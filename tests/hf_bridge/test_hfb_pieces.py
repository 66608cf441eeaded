"""Shard reads: the row layout (pieces) and the region reader agree with plain slicing."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from plugtron.config.base import padded_vocab_size
from plugtron.conversion.pieces import rows_from_pieces
from plugtron.sharding import local_row_ranges, tp_slice
from plugtron_gpt.hf.catalogue import mapping_for, to_megatron_fields
from plugtron_hf_bridge.errors import CheckpointFormatError, MappingError
from plugtron_hf_bridge.region_io import RegionReader
from plugtron_hf_bridge.safetensors_io import SafetensorsCheckpoint, ShardedSafetensorsWriter

from hfb_helpers import ARCHS, hf_config


def _assemble(mapping, tensors, start, stop):
    return rows_from_pieces(mapping.pieces, mapping.megatron_shape, tensors, start, stop)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tp", [1, 2])
def test_pieces_give_each_rank_its_tp_slice(arch: str, tp: int) -> None:
    config = hf_config(arch, vocab=101).to_dict()
    config["architectures"] = [arch]
    fields = to_megatron_fields(config)
    padded = padded_vocab_size(fields["vocab_size"], 8, tp)
    gen = torch.Generator().manual_seed(0)
    for mapping in mapping_for(arch, fields, padded_vocab_size=padded):
        tensors = {n: torch.randn(s, generator=gen) for n, s in zip(mapping.hf_names, mapping.hf_shapes)}
        full = mapping.to_megatron([tensors[n] for n in mapping.hf_names])
        assert torch.equal(_assemble(mapping, tensors, 0, full.shape[0]), full), mapping.megatron_name
        if full.dim() == 0 or tp == 1:
            continue
        glu = fields["gated_linear_unit"] and "linear_fc1" in mapping.megatron_name
        marker = dataclasses.make_dataclass("P", [("tensor_model_parallel", bool), ("partition_dim", int)])(True, 0)
        for rank in range(tp):
            rows = local_row_ranges(full.shape[0], tp, rank, [full.shape[0] // 2] * 2 if glu else None)
            got = torch.cat([_assemble(mapping, tensors, a, b) for a, b in rows])
            assert torch.equal(got, tp_slice(full, marker, rank, tp, glu=glu)), (mapping.megatron_name, rank)


@pytest.fixture
def stored(tmp_path):
    gen = torch.Generator().manual_seed(1)
    tensors = {"w": torch.randn(37, 11, generator=gen).to(torch.bfloat16), "b": torch.randn(9, generator=gen)}
    with ShardedSafetensorsWriter(tmp_path, max_shard_bytes=600) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
    return tmp_path, tensors


def test_region_reader_rows_columns_transpose_and_cast(stored) -> None:
    directory, tensors = stored
    w = tensors["w"]
    with SafetensorsCheckpoint(directory) as ckpt, RegionReader(ckpt, chunk_bytes=50) as reader:
        assert torch.equal(reader.read("w"), w) and torch.equal(reader.read("b", (2, 7)), tensors["b"][2:7])
        assert torch.equal(reader.read("w", (3, 30), (2, 9)), w[3:30, 2:9])
        out = torch.empty(7, 27, dtype=torch.float32)
        reader.read_into("w", out, (3, 30), (2, 9), transpose=True)
        assert torch.equal(out, w[3:30, 2:9].t().float())
        param = torch.empty(10, 11, dtype=torch.bfloat16)
        reader.read_into("w", param[2:6], (5, 9))  # straight into a contiguous row block
        assert torch.equal(param[2:6], w[5:9])
        assert reader.bytes_read > 0
        with pytest.raises(MappingError, match="'w'"):
            reader.read_into("w", torch.empty(3, 11), (0, 4))
        with pytest.raises(CheckpointFormatError, match="outside"):
            reader.read("w", (30, 40))


def test_region_reader_reports_a_file_shrunk_after_validation(stored) -> None:
    directory, _ = stored
    with SafetensorsCheckpoint(directory) as ckpt, RegionReader(ckpt) as reader:
        path = ckpt.file_of("w")
        path.write_bytes(path.read_bytes()[:-100])
        with pytest.raises(CheckpointFormatError, match="ended early"):
            reader.read("w")  # read straight into the destination: a short read
        with pytest.raises(CheckpointFormatError, match="ended early"):
            reader.read("w", (0, 37), (2, 9))  # columns go through a mapping: checked before mapping
