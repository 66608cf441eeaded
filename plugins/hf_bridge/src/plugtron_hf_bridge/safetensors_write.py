"""Writing one safetensors file from tensors that need not be contiguous, or even assembled.

``safetensors.torch.save_file`` needs every tensor contiguous, so an exporter
had to build each HF tensor in fresh memory first: ``q_proj`` of a megatron
``linear_qkv`` is one row block per query group, interleaved with ``k`` and
``v``. Fresh memory is what costs here (on this machine's VM the first touch
of new pages made those copies 0.3 s of a 250M model's 0.45 s export), so this
writer takes a tensor as :class:`Rows`, consecutive row blocks of existing
tensors (views into the model), and writes each block's bytes where they
belong. A non-contiguous tensor is written through one reused staging buffer.
The file goes through the page cache while the kernel's pages come cheap and
around it once they do not (:mod:`plugtron.runtime.adaptive_write`).

The layout is the format's own, as the reference writer lays it out: an
8-byte little-endian header length, the JSON header padded with spaces to a
multiple of 8, then the data with tensors ordered by element size (largest
first) and name, so each tensor starts at a multiple of its element size.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, Union

import torch

from plugtron.runtime.adaptive_write import open_adaptive

from .safetensors_header import DTYPES

_TAGS = {name: tag for tag, (name, _, _) in DTYPES.items()}
#: Bytes staged at a time when a block is not contiguous.
STAGING_BYTES = 16 * 2**20


class Rows(NamedTuple):
    """A tensor given as consecutive blocks along dim 0 (same dtype, same trailing shape): written, never built."""

    parts: tuple[torch.Tensor, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        first = self.parts[0]
        return (sum(part.shape[0] for part in self.parts), *first.shape[1:])

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    def nbytes(self) -> int:
        return sum(part.numel() * part.element_size() for part in self.parts)

    def contiguous(self) -> torch.Tensor:
        """The assembled tensor (for callers that need one)."""
        return torch.cat(self.parts) if len(self.parts) > 1 else self.parts[0].contiguous()


Writable = Union[torch.Tensor, Rows]


def nbytes(tensor: Writable) -> int:
    return tensor.nbytes() if isinstance(tensor, Rows) else tensor.numel() * tensor.element_size()


def tag(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _TAGS:
        raise ValueError(f"safetensors cannot store dtype {name}")
    return _TAGS[name]


def write_file(path: str | Path, tensors: dict[str, Writable], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as one safetensors file at ``path``."""
    order = sorted(tensors, key=lambda name: (-tensors[name].dtype.itemsize, name))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        size = nbytes(tensors[name])
        header[name] = {"dtype": tag(tensors[name].dtype), "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    staging = _Staging()
    with open_adaptive(path) as handle:  # through the page cache while that is cheap (plugtron.runtime.adaptive_write)
        handle.write(len(raw).to_bytes(8, "little"))
        handle.write(raw)
        for name in order:
            tensor = tensors[name]
            for part in tensor.parts if isinstance(tensor, Rows) else (tensor,):
                _write_tensor(handle, part, staging)


class _Staging:
    """One buffer for the blocks of non-contiguous tensors, allocated on first need and reused."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def take(self, size: int) -> torch.Tensor:
        if self.buffer is None or self.buffer.numel() < size:
            self.buffer = torch.empty(max(size, STAGING_BYTES), dtype=torch.uint8)
        return self.buffer[:size]


def _write_tensor(handle: BinaryIO, tensor: torch.Tensor, staging: _Staging) -> None:
    if tensor.numel() == 0:
        return
    if tensor.is_contiguous():
        handle.write(byte_view(tensor).numpy())
        return
    row_bytes = math.prod(tensor.shape[1:]) * tensor.element_size()  # a 0-d tensor is always contiguous
    for block in tensor.split(max(1, STAGING_BYTES // max(row_bytes, 1))):
        size = block.numel() * block.element_size()
        out = staging.take(size)
        out.view(block.dtype).view(block.shape).copy_(block)
        handle.write(out.numpy())


def byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous tensor as a flat uint8 view (no copy)."""
    return tensor.reshape(-1).view(torch.uint8)
