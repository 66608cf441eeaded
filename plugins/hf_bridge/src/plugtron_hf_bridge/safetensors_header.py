"""Safetensors headers and checkpoint directories, validated without importing torch.

Every check on a checkpoint's layout happens here, before any tensor byte is
read: pickle files are refused, each header is parsed strictly (duplicate keys,
malformed entries, offsets past the end of the file, tensors that do not tile
the data section exactly), and a sharded index may only name plain files
inside the directory. :mod:`.safetensors_io` builds on it with torch dtypes and
tensor reads.

Why apart from torch: a command that starts several ranks validates the
checkpoint in the launcher first, and importing torch there (about a second)
would add to every such command before any rank starts.
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path
from typing import Any, NamedTuple

from plugtron.untrusted import DuplicateKeyError, UntrustedFileError, parse_json_strict, read_json, regular_file_inside

from .errors import CheckpointFormatError, TensorNotFoundError, checkpoint_errors

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_MAX_HEADER_BYTES = 100 * 2**20  # the format's own reference limit

#: safetensors dtype tag -> (torch dtype name, bytes per element, floating point).
DTYPES: dict[str, tuple[str, int, bool]] = {
    "F64": ("float64", 8, True), "F32": ("float32", 4, True), "F16": ("float16", 2, True),
    "BF16": ("bfloat16", 2, True), "I64": ("int64", 8, False), "I32": ("int32", 4, False),
    "I16": ("int16", 2, False), "I8": ("int8", 1, False), "U8": ("uint8", 1, False),
    "U16": ("uint16", 2, False), "U32": ("uint32", 4, False), "U64": ("uint64", 8, False),
    "BOOL": ("bool", 1, False), "F8_E4M3": ("float8_e4m3fn", 1, True), "F8_E5M2": ("float8_e5m2", 1, True),
}


class HeaderEntry(NamedTuple):
    """What a safetensors header says about one tensor (``tag``: ``"BF16"``, ``"F32"`` ...)."""

    tag: str
    shape: tuple[int, ...]
    file: Path
    #: Absolute byte offset of the tensor's data in ``file`` (for direct reads).
    offset: int

    @property
    def dtype_name(self) -> str:
        return DTYPES[self.tag][0]

    @property
    def itemsize(self) -> int:
        return DTYPES[self.tag][1]

    @property
    def is_floating_point(self) -> bool:
        return DTYPES[self.tag][2]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize


def read_entries(path: str | Path) -> dict[str, HeaderEntry]:
    """Parse and validate a safetensors header without reading any tensor data.

    Raises :class:`CheckpointFormatError` naming ``path`` (and the tensor where
    relevant) if the header is malformed, names a tensor twice, points past the
    end of the file, or its tensors do not tile the data section exactly. The
    reference reader refuses such files as well, and overlapping byte ranges
    would let one tensor's bytes be read as another's.
    """
    path = Path(path)
    header_len, raw, size = _header_bytes(path)
    header = _parse_header(path, raw)
    data_size = size - 8 - header_len
    infos: dict[str, HeaderEntry] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            _check_metadata(path, entry)
            continue
        tag, shape, begin, end = _entry(path, name, entry)
        if end > data_size:
            raise CheckpointFormatError(
                path, f"truncated: tensor '{name}' ends at byte {end} of the data section but only {data_size} bytes are present"
            )
        infos[name] = HeaderEntry(tag, shape, path, 8 + header_len + begin)
        spans.append((begin, end, name))
    _check_tiling(path, spans, data_size)
    return infos


def _header_bytes(path: Path) -> tuple[int, bytes, int]:
    """(header length, header JSON bytes, file size), refusing files too short for what they claim."""
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise CheckpointFormatError(path, "is not a regular file; refusing to read it")
            size = info.st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointFormatError(path, f"file is {size} bytes, too short for a safetensors header")
            header_len = int.from_bytes(prefix, "little")
            if header_len > _MAX_HEADER_BYTES:
                raise CheckpointFormatError(path, f"header length {header_len} is implausible; not a safetensors file?")
            if 8 + header_len > size:
                raise CheckpointFormatError(
                    path, f"truncated: header needs {header_len} bytes but the file has {size - 8} after the length prefix"
                )
            return header_len, f.read(header_len), size
    except OSError as exc:
        raise CheckpointFormatError(path, f"cannot read file: {exc}") from exc


def _parse_header(path: Path, raw: bytes) -> dict[str, Any]:
    """The header as a dict; a key listed twice is refused (JSON readers disagree on which entry wins)."""
    try:
        header = parse_json_strict(raw, path)
    except UntrustedFileError as exc:
        duplicate = exc.__cause__
        if isinstance(duplicate, DuplicateKeyError):
            problem = f"header lists '{duplicate.key}' twice; tensor names (and entry fields) must be unique"
            raise CheckpointFormatError(path, problem) from exc
        raise CheckpointFormatError(path, f"header {exc.problem}") from exc
    if not isinstance(header, dict):
        raise CheckpointFormatError(path, "header is not a JSON object")
    return header


def _check_metadata(path: Path, metadata: Any) -> None:
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointFormatError(path, f"header '__metadata__' must map strings to strings, got {metadata!r:.200}")


def _non_negative_ints(value: Any, length: int | None = None) -> tuple[int, ...]:
    """A JSON list of non-negative integers (not floats, strings or booleans), else ValueError."""
    if not isinstance(value, list) or (length is not None and len(value) != length):
        raise ValueError(value)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise ValueError(value)
    return tuple(value)


def _entry(path: Path, name: str, entry: Any) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype tag, shape, begin, end) of one header entry, its byte count matching dtype and shape."""
    try:
        tag = entry["dtype"]
        itemsize = DTYPES[tag][1]
        shape = _non_negative_ints(entry["shape"])
        begin, end = _non_negative_ints(entry["data_offsets"], 2)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointFormatError(path, f"tensor '{name}' has a malformed or unsupported header entry {entry!r:.300}") from exc
    if begin > end or end - begin != math.prod(shape) * itemsize:
        raise CheckpointFormatError(path, f"tensor '{name}': offsets {begin}..{end} do not fit shape {shape} of {entry['dtype']}")
    return tag, shape, begin, end


def _check_tiling(path: Path, spans: list[tuple[int, int, str]], data_size: int) -> None:
    """The format's layout rule: sorted by (begin, end), each tensor starts where the previous one
    ended, the first at 0 and the last at the end of the data section; no overlap, gap or trailing
    bytes (the reference reader refuses all three). A zero-size tensor takes no bytes, so it may sit
    at any boundary between tensors, but not inside one."""
    at, previous = 0, None
    for begin, end, name in sorted(spans):
        if begin < at:
            problem = f"tensor '{name}' (bytes {begin}..{end}) overlaps tensor '{previous}', which ends at byte {at}"
            raise CheckpointFormatError(path, problem)
        if begin > at:
            after = f"after tensor '{previous}'" if previous else "at the start of the data section"
            raise CheckpointFormatError(path, f"tensor '{name}' starts at byte {begin}, leaving a gap of {begin - at} bytes {after}")
        at, previous = end, name
    if at != data_size:
        last = f" ('{previous}')" if previous else ""
        raise CheckpointFormatError(path, f"the data section has {data_size - at} bytes after the last tensor{last} that none claims")


def _present(path: Path) -> bool:
    """Exists, or is a symlink (even a dangling one, which must be refused by name, not reported as absent)."""
    return path.exists() or path.is_symlink()


class SafetensorsIndex:
    """The validated table of contents of a ``model.safetensors`` or sharded HF checkpoint.

    All headers are checked at construction; no tensor data is read.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointFormatError(self.directory, "checkpoint directory does not exist")
        single, index = self.directory / SINGLE_FILE, self.directory / INDEX_FILE
        if _present(single) and _present(index):
            raise CheckpointFormatError(
                self.directory, f"both {SINGLE_FILE} and {INDEX_FILE} exist; remove the stale one so the checkpoint is unambiguous"
            )
        self._infos: dict[str, HeaderEntry] = {}
        if _present(index):
            self._load_index(self._member(INDEX_FILE))
        elif _present(single):
            self._infos = read_entries(self._member(SINGLE_FILE))
        else:
            pickles = sorted(p.name for p in self.directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise CheckpointFormatError(
                    self.directory,
                    f"only safetensors checkpoints are read; refusing pickle file(s) {pickles} "
                    "(unpickling can execute code). Convert them to safetensors with a trusted tool first",
                )
            others = sorted(p.name for p in self.directory.glob("*.safetensors"))
            raise CheckpointFormatError(
                self.directory, f"no {SINGLE_FILE} or {INDEX_FILE} found" + (f" (found {others})" if others else "")
            )

    def _member(self, name: str, *, required: bool = True) -> Path | None:
        """``name`` in the checkpoint directory, only if it is a regular file that stays inside it
        (a link to ``/dev/zero`` or out of the directory is refused by name, never followed)."""
        with checkpoint_errors():
            return regular_file_inside(self.directory, name, required=required)

    def _load_index(self, index: Path) -> None:
        with checkpoint_errors():
            weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointFormatError(index, f"unreadable shard index: 'weight_map' must be a JSON object, got {weight_map!r:.100}")
        headers: dict[str, dict[str, HeaderEntry]] = {}
        for name, fname in weight_map.items():
            if not isinstance(fname, str) or Path(fname).name != fname or fname in ("", ".", ".."):
                raise CheckpointFormatError(index, f"tensor '{name}' maps to {fname!r}, which is not a plain file name")
            if fname not in headers:
                shard = self._member(fname, required=False)
                if shard is None:
                    raise CheckpointFormatError(self.directory / fname, f"shard listed in {INDEX_FILE} is missing")
                headers[fname] = read_entries(shard)
            if name not in headers[fname]:
                raise CheckpointFormatError(self.directory / fname, f"{INDEX_FILE} says tensor '{name}' is here, but it is not")
            self._infos[name] = headers[fname][name]

    def entry(self, name: str) -> HeaderEntry:
        try:
            return self._infos[name]
        except KeyError:
            raise TensorNotFoundError(self.directory, name) from None

    def entries(self) -> dict[str, HeaderEntry]:
        return dict(self._infos)

    def names(self) -> list[str]:
        """All tensor names, sorted."""
        return sorted(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entry(name).shape

    def file_of(self, name: str) -> Path:
        return self.entry(name).file
