"""The block-wise tensor-parallel slicing rule of the mixer's fused tensors (no processes needed)."""

from __future__ import annotations

import pytest
import torch

from plugtron_mamba import tp_layout


def test_row_blocks_of_the_fused_tensors(tiny_config):
    config = tiny_config().finalize()  # d_inner 128, 2 groups x state 16, 8 heads
    assert tp_layout.row_blocks("decoder.layers.0.mixer.in_proj.weight", config) == [128, 128, 32, 32, 8]
    assert tp_layout.row_blocks("decoder.layers.2.mixer.conv1d.weight", config) == [128, 32, 32]
    assert tp_layout.row_blocks("decoder.layers.2.mixer.conv1d.bias", config) == [128, 32, 32]
    for plain in ("decoder.layers.0.mixer.dt_bias", "decoder.layers.0.mixer.out_proj.weight",
                  "decoder.layers.3.mlp.linear_fc1.weight", "output_layer.weight"):
        assert tp_layout.row_blocks(plain, config) is None
    glu = tiny_config(gated_linear_unit=True).finalize()
    assert tp_layout.row_blocks("decoder.layers.3.mlp.linear_fc1.weight", glu) == [96, 96]


@pytest.mark.parametrize("size", [1, 2, 4])
def test_slice_then_join_is_the_identity(size):
    blocks = [8, 8, 4, 4, 4]
    full = torch.arange(sum(blocks) * 3, dtype=torch.float32).view(sum(blocks), 3)
    parts = [tp_layout.slice_blocks(full, blocks, rank, size) for rank in range(size)]
    assert all(p.shape == (sum(blocks) // size, 3) for p in parts)
    assert torch.equal(tp_layout.join_blocks(parts, blocks), full)


def test_each_rank_gets_its_chunk_of_every_block_in_order():
    z, x, B, C, dt = (torch.full((n, 1), float(v)) for v, n in zip(range(5), [4, 4, 2, 2, 2]))
    full = torch.cat([z, x, B, C, dt])
    rank1 = tp_layout.slice_blocks(full, [4, 4, 2, 2, 2], 1, 2).flatten().tolist()
    assert rank1 == [0, 0, 1, 1, 2, 3, 4]  # [z_1 | x_1 | B_1 | C_1 | dt_1]
    assert not torch.equal(tp_layout.slice_blocks(full, [4, 4, 2, 2, 2], 1, 2), full.chunk(2)[1])


def test_uneven_blocks_are_an_error():
    with pytest.raises(ValueError, match="cannot be split evenly"):
        tp_layout.slice_blocks(torch.zeros(9, 2), [4, 5], 0, 2)
    with pytest.raises(ValueError, match="do not add up"):
        tp_layout.slice_blocks(torch.zeros(9, 2), [4, 4], 0, 2)


def test_replicated_and_plain_parameters_use_the_core_rule(tiny_config):
    config = tiny_config().finalize()
    full = torch.randn(64, 8)
    replicated = torch.nn.Parameter(torch.zeros(32, 8))
    assert tp_layout.tp_slice(full, "decoder.layers.0.mixer.in_proj.layer_norm_weight", replicated, 1, 2, config) is full
    column = torch.nn.Parameter(torch.zeros(32, 8))
    column.tensor_model_parallel, column.partition_dim = True, 0
    assert torch.equal(tp_layout.tp_slice(full, "output_layer.weight", column, 1, 2, config), full[32:])
