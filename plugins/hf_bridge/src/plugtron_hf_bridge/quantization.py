"""Quantised HF checkpoints: which ones the engine dequantises on import, and how.

Published checkpoints ship some weights quantised (DeepSeek-V3 / Kimi-K2: FP8 e4m3 in
128 x 128 blocks, each block scaled by one float of ``<name>_scale_inv``; gpt-oss: MXFP4
experts as ``<name>_blocks`` + ``<name>_scales``). megatron models here hold float weights,
so the engine dequantises on import, per rank, reading only the rank's rows of a weight
and the scale rows those rows need (block row ``r // 128``), never loading a scale as a
weight. The imported model is in ``--dtype`` (default bfloat16, not the stored float8).

Who decides what. The *architecture* decides whether its checkpoints may be quantised:
its config reader must accept the ``quantization_config`` key (a reader that does not
refuses it as unknown, as for every architecture that never ships quantised). The
*engine* decides how: :func:`scheme_of` validates the same key again for every import,
and :class:`QuantizedReader` does the arithmetic. Tensor tables stay about megatron
layouts: they name ``...weight`` and never a scale.

The config-level part (:data:`FP8`, :data:`MXFP4`, :class:`Scheme`, :func:`accept`,
:func:`accepts`, :func:`scheme_of`) is the core's :mod:`plugtron.conversion.quantization`,
re-exported here: architecture modules use the core's, never this module.
- :func:`dequantize_fp8`, :func:`dequantize_mxfp4`: the arithmetic, exactly as published:
  ``weight.float() * scale_inv`` per block; MXFP4 ``e2m1[nibble] * 2 ** (scale - 127)``, the
  low nibble first.

What is refused: per-tensor FP8 (no ``weight_block_size``), static activation scales
(``activation_scheme: static`` ships ``input_scale`` tensors), formats other than e4m3.
MXFP4: :func:`dequantize_mxfp4` is exact, but no architecture that converts stores it
(gpt-oss is refused, :mod:`plugtron_gpt.hf.gpt_oss`), so the engine refuses a checkpoint
that holds ``_blocks`` tensors by name until one does.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from plugtron.conversion import UnsupportedConfigError
from plugtron.conversion.quantization import FP8, KEY, METHODS, MXFP4, Scheme, accept, accepts, scheme_of

__all__ = ["FP8", "KEY", "METHODS", "MXFP4", "Scheme", "accept", "accepts", "scheme_of", "dequantize_fp8",
           "dequantize_mxfp4", "write_dequantized", "reader"]

if TYPE_CHECKING:
    import torch

    from .safetensors_header import SafetensorsIndex

#: Companion tensor name suffixes.
SCALE_INV = "_scale_inv"
BLOCKS, SCALES = "_blocks", "_scales"
#: FP4 e2m1 values by nibble (sign bit 3, exponent bits 2-1, mantissa bit 0).
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_FP8_DTYPES = ("float8_e4m3fn", "float8_e5m2")


# -- the checkpoint against the scheme (preflight, torch-free) ------------------------------------------
def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """The ``_scale_inv`` grid of a 2-D weight: one float per (partial) block."""
    return (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))


def companion_of(name: str) -> str | None:
    """The weight a companion tensor (scale, MXFP4 blocks) belongs to; None for a plain tensor."""
    for suffix in (SCALE_INV, BLOCKS, SCALES):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def scaled_weights(index: "SafetensorsIndex", scheme: Scheme | None) -> dict[str, str]:
    """weight -> its ``_scale_inv`` for every FP8 weight of the checkpoint (empty unless the scheme is FP8)."""
    if scheme is None or scheme.method != FP8:
        return {}
    names = set(index.names())
    return {n[: -len(SCALE_INV)]: n for n in names if n.endswith(SCALE_INV) and n[: -len(SCALE_INV)] in names}


def problems(index: "SafetensorsIndex", needed: Iterable[str], scheme: Scheme | None) -> dict[str, list[str]]:
    """What is wrong with the quantised tensors among ``needed``, by kind (all collected; empty when fine).

    Without a scheme any float8 tensor is refused (its block scales would be ignored); with FP8
    every float8 weight needs a float ``_scale_inv`` of the block grid's shape, and a scale
    belongs to a float8 weight; MXFP4 tensors are refused by name (see the module doc).
    """
    entries = index.entries()
    out: dict[str, list[str]] = {"quantised tensors that cannot be dequantised": [],
                                 "block scales that do not fit their weight": []}
    fp8 = [n for n in needed if n in entries and entries[n].dtype_name in _FP8_DTYPES]
    if scheme is None or scheme.method != FP8:
        why = f"config.json has no {KEY}" if scheme is None else f"{KEY} says {scheme.method}"
        out["quantised tensors that cannot be dequantised"] += [
            f"{n} is stored as {entries[n].dtype_name} ({why})" for n in fp8]
    mx = sorted(n for n in entries if n.endswith(BLOCKS) and n[: -len(BLOCKS)] + SCALES in entries)
    out["quantised tensors that cannot be dequantised"] += [
        f"{n} (MXFP4 blocks): no architecture that converts reads MXFP4 checkpoints yet" for n in mx]
    if scheme is not None and scheme.method == FP8:
        out["block scales that do not fit their weight"] = _fp8_problems(entries, needed, fp8, scheme.block)
    return out


def _fp8_problems(entries: Mapping[str, Any], needed: Iterable[str], fp8: list[str], block: tuple[int, int]) -> list[str]:
    bad = []
    for name in fp8:
        weight, scale = entries[name], entries.get(name + SCALE_INV)
        if len(weight.shape) != 2:
            bad.append(f"{name} {weight.shape}: only 2-D weights are block-scaled")
        elif scale is None:
            bad.append(f"{name} is {weight.dtype_name} but {name + SCALE_INV} is missing")
        elif not scale.is_floating_point or scale.dtype_name in _FP8_DTYPES:
            bad.append(f"{name + SCALE_INV} is stored as {scale.dtype_name}; block scales are float32/bfloat16")
        elif scale.shape != scale_shape(weight.shape, block):
            bad.append(f"{name + SCALE_INV} {scale.shape} != {scale_shape(weight.shape, block)} "
                       f"(blocks of {list(block)} over {name} {weight.shape})")
    for name in needed:
        if name + SCALE_INV in entries and name in entries and entries[name].dtype_name not in _FP8_DTYPES:
            bad.append(f"{name + SCALE_INV} scales {name}, which is stored as {entries[name].dtype_name}, not float8")
    return bad


# -- arithmetic ---------------------------------------------------------------------------------------
def expand_scales(scale: "torch.Tensor", block: tuple[int, int], rows: tuple[int, int],
                  cols: tuple[int, int]) -> "torch.Tensor":
    """Per-element float32 scales of region ``rows x cols`` from the scale rows/cols covering it.

    ``scale``'s first row is block row ``rows[0] // block[0]``, its first column block column
    ``cols[0] // block[1]``.
    """
    full = scale.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    r, c = rows[0] % block[0], cols[0] % block[1]
    return full[r:r + rows[1] - rows[0], c:c + cols[1] - cols[0]]


def dequantize_fp8(weight: "torch.Tensor", scale_inv: "torch.Tensor", block: tuple[int, int]) -> "torch.Tensor":
    """A whole block-scaled FP8 weight in float32: ``weight.float() * scale_inv`` per block."""
    rows, cols = weight.shape
    return weight.float() * expand_scales(scale_inv, block, (0, rows), (0, cols))


def dequantize_mxfp4(blocks: "torch.Tensor", scales: "torch.Tensor") -> "torch.Tensor":
    """MXFP4 ``[..., G, 16]`` uint8 blocks and ``[..., G]`` uint8 exponents -> float32 ``[..., G * 32]``.

    Each byte holds two e2m1 values, the low nibble first; each group of 32 is scaled by
    ``2 ** (scale - 127)`` (an e8m0 exponent), as gpt-oss stores its experts.
    """
    import torch

    lut = torch.tensor(E2M1, dtype=torch.float32)
    b = blocks.to(torch.uint8)
    values = torch.stack([lut[(b & 0x0F).long()], lut[(b >> 4).long()]], dim=-1).flatten(-2)  # [..., G, 32]
    values = torch.ldexp(values, scales.to(torch.int32).unsqueeze(-1) - 127)
    return values.flatten(-2)


# -- a plain copy, for a reference ------------------------------------------------------------------------
def write_dequantized(src: Any, dst: Any, dtype_name: str = "float32") -> Any:
    """A plain checkpoint of ``src``'s dequantised values in ``dst``: config.json without its
    ``quantization_config``, each FP8 weight as ``weight.float() * scale_inv`` cast to ``dtype_name``,
    other tensors as stored, no scales.

    Why: transformers 5.23 loads FP8 checkpoints only with ``accelerate`` and, on CPU, only when
    every side is a multiple of the block; a logit reference for ``plugtron verify`` (or a test)
    is transformers on this copy. Streams one tensor at a time into size-limited shards.
    """
    import json
    from pathlib import Path

    import torch

    from plugtron.untrusted import read_json

    from .safetensors_io import SafetensorsCheckpoint, ShardedSafetensorsWriter

    src, dst = Path(src), Path(dst)
    config = read_json(src / "config.json")
    scheme = scheme_of(config, str(src / "config.json"))
    config.pop(KEY, None)
    with SafetensorsCheckpoint(src) as ckpt, reader(ckpt, scheme) as read, ShardedSafetensorsWriter(dst) as out:
        scales = set(getattr(read, "scales", {}).values())
        for name in ckpt.names():
            if name in scales:
                continue
            tensor = read.read(name)
            out.add(name, tensor.to(getattr(torch, dtype_name)) if name in getattr(read, "scales", {}) else tensor)
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dst


# -- reading -------------------------------------------------------------------------------------------
def reader(checkpoint: Any, scheme: Scheme | None) -> Any:
    """The region reader for an import: dequantising when the checkpoint is FP8."""
    from .region_io import RegionReader

    if scheme is None or scheme.method != FP8:
        return RegionReader(checkpoint)
    return __getattr__("QuantizedReader")(checkpoint, scheme)


def _quantized_reader_class() -> type:
    from .region_io import RegionReader

    class QuantizedReader(RegionReader):
        """A :class:`~.region_io.RegionReader` that dequantises block-scaled FP8 weights on the way.

        A region of a weight is read with the rows and columns of its scale grid that cover it
        (block row ``r // block_rows``), a band of whole blocks at a time (bounded like any read),
        multiplied in float32 and cast into the destination. Plain tensors are read as before.
        """

        def __init__(self, checkpoint: Any, scheme: Scheme, chunk_bytes: int | None = None) -> None:
            super().__init__(checkpoint, *(() if chunk_bytes is None else (chunk_bytes,)))
            self.block = scheme.block
            self.scales = scaled_weights(checkpoint, scheme)

        def read(self, name: str, rows: Any = None, cols: Any = None) -> "torch.Tensor":
            if name not in self.scales:
                return super().read(name, rows, cols)
            import torch

            shape = self.checkpoint.info(name).shape
            rows, cols = rows or (0, shape[0]), cols or (0, shape[1])
            out = torch.empty(rows[1] - rows[0], cols[1] - cols[0], dtype=torch.float32)
            self.read_into(name, out, rows, cols)
            return out

        def read_into(self, name: str, out: "torch.Tensor", rows: Any, cols: Any = None, *, transpose: bool = False) -> None:
            scale = self.scales.get(name)
            if scale is None:
                super().read_into(name, out, rows, cols, transpose=transpose)
                return
            import torch

            info = self.checkpoint.info(name)
            cols = cols or (0, info.shape[1])
            want = (cols[1] - cols[0], rows[1] - rows[0]) if transpose else (rows[1] - rows[0], cols[1] - cols[0])
            if tuple(out.shape) != want:
                from .errors import MappingError

                raise MappingError(name, f"region rows {rows} cols {cols} does not fit the destination {tuple(out.shape)}")
            br, bc = self.block
            sc = (cols[0] // bc, math.ceil(cols[1] / bc))
            band = max(1, self.chunk_bytes // max(4 * (cols[1] - cols[0]), 1) // br) * br
            start = rows[0]
            while start < rows[1]:
                stop = min(rows[1], (start // br) * br + band)
                q = torch.empty(stop - start, cols[1] - cols[0], dtype=info.dtype)
                super().read_into(name, q, (start, stop), cols)
                s = super().read(scale, (start // br, math.ceil(stop / br)), sc)
                values = q.float() * expand_scales(s, self.block, (start, stop), cols)
                lo, hi = start - rows[0], stop - rows[0]
                if transpose:
                    out[:, lo:hi].copy_(values.t())
                else:
                    out[lo:hi].copy_(values)
                start = stop

    return QuantizedReader


def __getattr__(name: str) -> Any:  # QuantizedReader needs torch: built on first use, keeping this module torch-free
    if name == "QuantizedReader":
        cls = globals().get("_READER") or _quantized_reader_class()
        globals()["_READER"] = cls
        return cls
    raise AttributeError(name)
