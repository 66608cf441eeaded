"""Atomic writes: a reader sees the old file or directory or the new one, never half of one.

Three rules protect what the user already has:

- :func:`check_destination` refuses an output that is, contains or lies inside
  one of the command's sources, with or without ``overwrite`` (replacing it
  would destroy the input while it is being read);
- :func:`atomic_output_dir` builds the output in a temporary directory beside
  the destination and publishes it with one rename; any failure (exception,
  signal, disk full) removes the temporary directory and leaves the old
  destination as it was;
- without ``overwrite`` the publishing rename refuses to replace anything,
  atomically (``renameat2(RENAME_NOREPLACE)`` on Linux): of two commands
  writing one destination at once exactly one wins, and the other fails
  clearly instead of replacing the winner's output.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from plugtron.errors import OutputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a config file is for everyone to read
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def check_destination(dst: str | Path, *, sources: Iterable[str | Path] = (), overwrite: bool = False) -> Path:
    """Refuse a destination that exists (unless ``overwrite``) or overlaps a source in any way."""
    dst = Path(dst)
    target = dst.resolve()
    for source in sources:
        src = Path(source).resolve()
        if target == src:
            raise OutputError(dst, f"is the source {source}; refusing to write over the input")
        if src in target.parents:
            raise OutputError(dst, f"lies inside the source {source}; write the output elsewhere")
        if target in src.parents:
            raise OutputError(dst, f"contains the source {source}; replacing it would destroy the input")
    if _exists(dst) and not overwrite:
        raise OutputError(dst, "output already exists; pass --overwrite to replace it")
    return dst


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _renameat2() -> "ctypes._CFuncPtr | None":
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.renameat2
    except (OSError, AttributeError):
        return None


def rename_no_replace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, failing with FileExistsError if ``dst`` exists, atomically where the OS can."""
    function = _renameat2()
    if function is not None:
        if function(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS):  # EINVAL/ENOSYS: this filesystem cannot; fall back
            raise OSError(code, os.strerror(code), str(dst))
    if _exists(dst):  # fallback: a directory rename still refuses a non-empty target (ENOTEMPTY)
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _make_temp_dir(dst: Path) -> Path:
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    except OSError as exc:
        raise OutputError(dst, f"cannot create the output next to it: {exc.strerror or exc}") from exc
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the result normal permissions
    return tmp


def _publish(tmp: Path, dst: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``dst``; with ``overwrite`` the old one is deleted only afterwards."""
    if not overwrite:
        try:
            rename_no_replace(tmp, dst)
        except (FileExistsError, OSError) as exc:
            if isinstance(exc, FileExistsError) or exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise OutputError(dst, "was created by someone else while this command ran; left it as it is") from None
            raise
        return
    old: Path | None = None
    if _exists(dst):
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        old.rmdir()
        os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        if old is not None:
            os.rename(old, dst)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()


@contextlib.contextmanager
def atomic_output_dir(dst: str | Path, overwrite: bool = False, *, sources: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``dst`` only if the block succeeds.

    The temporary directory sits next to ``dst`` so the final rename is atomic
    (same filesystem). On failure it is removed and ``dst`` is untouched. With
    ``overwrite``, an existing ``dst`` is moved aside and deleted only after the
    new directory is in place; without it, a ``dst`` that appears meanwhile wins.
    """
    dst = check_destination(dst, sources=sources, overwrite=overwrite)
    tmp = _make_temp_dir(dst)
    try:
        yield tmp
        _publish(tmp, dst, overwrite)
    except BaseException as exc:  # torch's CheckpointException is a BaseException; signals arrive as SystemExit
        shutil.rmtree(tmp, ignore_errors=True)  # first: frees the space the free-space check below looks at
        problem = _write_problem(exc, dst)
        if problem:
            raise OutputError(dst, problem) from exc
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


#: errnos that mean "the destination cannot take this write", whatever file inside it was being written.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM}


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, what it wraps (``__cause__``, ``__context__``, torch's per-rank ``failures``), and so on."""
    seen, todo = set(), [exc]
    while todo:
        item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        todo += [e for e in (item.__cause__, item.__context__) if e is not None]
        for failure in (getattr(item, "failures", None) or {}).values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, BaseException):
                todo.append(inner)


def _write_problem(exc: BaseException, dst: Path) -> str | None:
    """Why writing the output failed, when it is the destination's fault (full, too large, read-only)."""
    from plugtron.errors import PlugtronError

    if isinstance(exc, (SystemExit, KeyboardInterrupt, GeneratorExit, PlugtronError)):
        return None
    for cause in _causes(exc):
        if isinstance(cause, OSError) and cause.errno in _WRITE_ERRNOS:
            return f"cannot write the output: {cause.strerror}; nothing was written"
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(dst.parent).free
        if free < 2**20:  # some writers (torch's zip writer) hide ENOSPC behind their own message
            return (f"cannot write the output: No space left on device ({free:,} bytes free where it goes); "
                    f"nothing was written ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    return None
