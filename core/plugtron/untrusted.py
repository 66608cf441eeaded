"""Reading files that strangers handed us: checkpoints, configs, side files.

One place decides what a file from a downloaded or shared directory may be
before any byte of it is read:

- a *regular* file, reached without leaving its directory: a symlink that
  points outside (``tokenizer.json -> ~/.ssh/id_rsa``) or at a device
  (``config.json -> /dev/zero``) is refused by name, never followed;
- small enough for what it claims to be: JSON side files are capped, so a
  huge or endless file fails at once instead of when memory runs out;
- JSON without duplicate keys (two entries for one name are ambiguous, and
  readers disagree on which one wins).

One layout leaves its directory on purpose: the Hugging Face hub cache keeps
``models--ORG--NAME/snapshots/REV/FILE`` as a symlink to ``../../blobs/HASH``.
A snapshot's links into its *own* repository's ``blobs`` folder are accepted;
any other link out is still refused.

Errors are :class:`UntrustedFileError` naming the file; the HF bridge's
``CheckpointFormatError`` subclasses it, so callers catch one type.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from plugtron.errors import PlugtronError

#: config.json, index files, tokenizer configs: real ones are kilobytes to a few MB
#: (a 128k-vocab tokenizer.json is ~10 MB); the cap leaves room and still bounds memory.
MAX_JSON_BYTES = 64 * 2**20


class UntrustedFileError(PlugtronError):
    """A file from a checkpoint or config directory is missing, unsafe or malformed; ``path`` names it."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def regular_file_inside(directory: str | Path, name: str | Path, *, required: bool = True) -> Path | None:
    """``directory / name`` if it is a regular file whose real path stays inside ``directory``.

    Returns None for an absent optional file; raises :class:`UntrustedFileError`
    for a symlink leading out, a special file (device, FIFO, socket) or a
    directory. A symlink *within* the directory is accepted only when its
    target is inside too; the one exception is a hub-cache snapshot's link
    into its repository's ``blobs`` folder (see :func:`hub_blobs_folder`).
    """
    directory = Path(directory)
    path = directory / name
    if not (path.exists() or path.is_symlink()):
        if required:
            raise UntrustedFileError(path, "file not found")
        return None
    try:
        root, real = directory.resolve(), path.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise UntrustedFileError(path, f"cannot resolve its links: {exc}") from exc
    if not _inside(real, root) and not _is_hub_blob(real, root):
        raise UntrustedFileError(path, f"is a link to {real}, outside {root}; refusing to follow it")
    try:
        mode = os.stat(real).st_mode
    except OSError as exc:
        raise UntrustedFileError(path, f"cannot stat: {exc.strerror}") from exc
    if not stat.S_ISREG(mode):
        raise UntrustedFileError(path, "is not a regular file (directory, device, FIFO or socket); refusing to read it")
    return path


def _inside(real: Path, root: Path) -> bool:
    return real == root or root in real.parents


#: Hub-cache repository folders of models: ``models--ORG--NAME`` (``models--NAME`` without an org).
HUB_REPO_PREFIX = "models--"


def hub_blobs_folder(root: Path) -> Path | None:
    """The ``blobs`` folder of the hub-cache model repository whose snapshot holds ``root``, else None.

    ``root`` is a resolved directory: the snapshot ``.../models--ORG--NAME/snapshots/REV``
    itself or a folder inside it (files in ``REV/sub/`` link to ``../../../blobs/HASH``).
    The folder is returned unresolved: if ``blobs`` were itself a link elsewhere, a real
    path through it would not lie in it and would be refused.
    """
    for snapshot in (root, *root.parents):
        snapshots = snapshot.parent
        if snapshot != snapshots and snapshots.name == "snapshots" and snapshots.parent.name.startswith(HUB_REPO_PREFIX):
            return snapshots.parent / "blobs"
    return None


def _is_hub_blob(real: Path, root: Path) -> bool:
    """Whether ``real`` is a file directly in the blobs folder of ``root``'s own hub-cache repository."""
    blobs = hub_blobs_folder(root)
    return blobs is not None and real.parent == blobs


def read_bytes_capped(path: str | Path, max_bytes: int) -> bytes:
    """The whole file, refusing one that is, or grows, past ``max_bytes`` (checked before reading)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise UntrustedFileError(path, "is not a regular file; refusing to read it")
            if info.st_size > max_bytes:
                raise UntrustedFileError(path, f"is {info.st_size:,} bytes, over the {max_bytes:,}-byte limit for this kind of file")
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise UntrustedFileError(path, f"cannot read: {exc.strerror or exc}") from exc
    if len(data) > max_bytes:
        raise UntrustedFileError(path, f"grew past the {max_bytes:,}-byte limit while being read")
    return data


class DuplicateKeyError(ValueError):
    """One JSON object names ``key`` twice (json.loads would silently keep the last)."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"key '{key}' appears twice in one JSON object; readers disagree on which entry wins")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKeyError(key)
        out[key] = value
    return out


def parse_json_strict(raw: bytes | str, path: str | Path) -> Any:
    """JSON text to Python, refusing duplicate keys; errors name ``path`` (and the key, for a duplicate)."""
    try:
        return json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except DuplicateKeyError as exc:
        raise UntrustedFileError(path, str(exc)) from exc
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UntrustedFileError(path, f"is not valid JSON: {exc}") from exc


def read_json(path: str | Path, *, max_bytes: int = MAX_JSON_BYTES, expect: type = dict) -> Any:
    """A small JSON file from an untrusted directory: capped, strict, and of the ``expect``\\ ed type."""
    data = parse_json_strict(read_bytes_capped(path, max_bytes), path)
    if expect is not None and not isinstance(data, expect):
        raise UntrustedFileError(path, f"must hold a JSON {'object' if expect is dict else expect.__name__}")
    return data
