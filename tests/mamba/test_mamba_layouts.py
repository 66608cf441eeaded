"""Data movement inside the fused mixer function: the layout promises its speed rests on.

Speed itself is measured in ``benchmarks/bench_mamba.py``, never here. These
tests pin two properties that a harmless-looking edit undoes without changing a
single number (both happened, and cost 10-40% of the mixer's time between its
projections on mamba2-130m):

* the scan writes each big intermediate straight into the layout its matmul or
  reshape reads, so the forward copies no sequence-sized tensor, and the
  backward copies exactly one (``dy`` turned heads-first for the in-chunk products);
* the conv's per-tap weight rows are contiguous (a strided row keeps the
  multiply-adds off their vectorised path).
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from plugtron_mamba.torch_impl.conv import _taps
from plugtron_mamba.torch_impl.inner import InnerShape, conv_scan_norm

#: heads, head dim, groups, state, chunk: 4 chunks of 64 over a 256-token sequence
SHAPE = InnerShape(nheads=4, headdim=32, ngroups=1, d_state=16, chunk=64, norm_eps=1e-5, norm_group=128)
SEQ = 256
#: a copy this big moves at least half a sequence's worth of x (seq * d_inner / 2 elements)
BIG = SEQ * SHAPE.d_inner // 2


class _CopyRecorder(TorchDispatchMode):
    """Records every clone / copy_ whose tensor has at least ``BIG`` elements."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: List[Dict[str, Any]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name in ("clone", "copy_", "contiguous") and args and args[-1].numel() >= BIG:
            self.copies.append({"op": name, "shape": tuple(args[-1].shape), "stride": args[-1].stride()})
        return func(*args, **(kwargs or {}))


def _inputs() -> Dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    d_in, conv = sum(SHAPE.splits), SHAPE.splits[1]
    h = SHAPE.nheads
    return {
        "zxbcdt": torch.randn(1, SEQ, d_in, generator=gen).requires_grad_(),
        "conv_weight": (torch.randn(conv, 1, 4, generator=gen) * 0.3).requires_grad_(),
        "conv_bias": torch.randn(conv, generator=gen).requires_grad_(),
        "dt_bias": torch.randn(h, generator=gen).requires_grad_(),
        "A_log": torch.rand(h, generator=gen).requires_grad_(),
        "D": torch.ones(h).requires_grad_(),
        "norm_weight": torch.ones(SHAPE.d_inner).requires_grad_(),
    }


def test_scan_forward_copies_no_sequence_sized_tensor() -> None:
    inputs = _inputs()
    with torch.no_grad(), _CopyRecorder() as recorder:
        conv_scan_norm(*inputs.values(), SHAPE)
    assert recorder.copies == []


def test_scan_backward_copies_only_dy_heads_first() -> None:
    inputs = _inputs()
    out = conv_scan_norm(*inputs.values(), SHAPE)
    with _CopyRecorder() as recorder:
        out.backward(torch.ones_like(out))
    chunks = SEQ // SHAPE.chunk
    assert [(c["op"], c["shape"]) for c in recorder.copies] == [
        ("clone", (1, chunks, SHAPE.nheads, SHAPE.chunk, SHAPE.headdim))
    ]
    assert all(param.grad is not None for param in inputs.values())


def test_conv_tap_rows_are_contiguous() -> None:
    weight = torch.randn(6, 1, 4)  # conv1d's [channels, 1, taps]: its [taps, channels] view is strided
    taps = _taps(weight, torch.float32)
    assert taps.shape == (4, 6) and taps.is_contiguous()
    torch.testing.assert_close(taps, weight[:, 0, :].t(), rtol=0, atol=0)
