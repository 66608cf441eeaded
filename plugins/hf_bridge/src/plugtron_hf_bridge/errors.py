"""Errors raised by the Hugging Face bridge.

Every error carries the *culprit* (a file, a tensor name or a config field) both
as an attribute and inside its message, because conversions run unattended on
multi-gigabyte checkpoints and "shape mismatch" without a name is useless in a
log.  :class:`ConversionError` subclasses :class:`plugtron.errors.PlugtronError`
so the ``plugtron`` command line reports every bridge error as one line with
exit code 2. The errors about a config or a tensor table (:class:`ConversionError`,
:class:`MappingError`, :class:`UnsupportedConfigError`) are the core's
(:mod:`plugtron.conversion.errors`): the families' architecture modules raise
them too. They are re-exported here so ``except`` clauses need one import.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from plugtron.conversion.errors import ConversionError, MappingError, UnsupportedConfigError
from plugtron.untrusted import UntrustedFileError

__all__ = ["CheckpointFormatError", "ConversionError", "MappingError", "TensorNotFoundError", "TensorSetError",
           "UnsupportedConfigError", "checkpoint_errors"]


class CheckpointFormatError(ConversionError, UntrustedFileError):
    """A checkpoint file or directory is missing, truncated, unsafe or malformed.

    ``path`` is the offending file or directory, ``problem`` what is wrong with
    it (the ``(path, problem)`` signature comes from
    :class:`plugtron.untrusted.UntrustedFileError`). Being both a
    :class:`ConversionError` and an ``UntrustedFileError``, it is caught by
    either, so callers that read strangers' files need one except clause.
    """


@contextlib.contextmanager
def checkpoint_errors() -> Iterator[None]:
    """Re-raise :mod:`plugtron.untrusted`'s errors as :class:`CheckpointFormatError`, same path and problem.

    Why: everything the bridge raises on purpose is a :class:`ConversionError`;
    the file named by the original error stays in the message.
    """
    try:
        yield
    except CheckpointFormatError:
        raise
    except UntrustedFileError as exc:
        raise CheckpointFormatError(exc.path, exc.problem) from exc


class TensorNotFoundError(CheckpointFormatError, KeyError):
    """A tensor name is not present in a checkpoint.

    Subclasses ``KeyError`` too, so dictionary-style callers can catch it the
    usual way.
    """

    def __init__(self, path: str | Path, name: str, hint: str = "") -> None:
        self.name = name
        extra = f" ({hint})" if hint else ""
        super().__init__(path, f"no tensor named '{name}' in this checkpoint{extra}")

    def __str__(self) -> str:  # KeyError would otherwise print the repr of args
        return Exception.__str__(self)


class TensorSetError(MappingError):
    """Tensors are missing, left unused or mis-shaped; *all* of them are named at once.

    Raised before any weight is written, so fixing a checkpoint takes one run,
    not one run per bad tensor.  ``names`` holds every culprit; ``categories``
    maps each problem to its culprits when :meth:`combined` reports several
    problems in one error (a checkpoint with both a missing and a mis-shaped
    tensor gets both lists, not just the first).
    """

    def __init__(self, problem: str, names: list[str], *, limit: int = 30) -> None:
        self.names = list(names)
        self.categories = {problem: self.names}
        text = _listed(problem, self.names, limit)
        super().__init__(self.names[0] if self.names else "?", text)
        self.args = (text,)

    @classmethod
    def combined(cls, where: str, categories: dict[str, list[str]], *, limit: int = 30) -> "TensorSetError | None":
        """One error for every non-empty category, ``"where: problem (n): names; problem (n): names"``; None if all are empty."""
        found = {problem: list(names) for problem, names in categories.items() if names}
        if not found:
            return None
        error = cls.__new__(cls)
        text = f"{where}: " + "; ".join(_listed(problem, names, limit) for problem, names in found.items())
        error.names = [name for names in found.values() for name in names]
        error.categories = found
        MappingError.__init__(error, error.names[0], text)
        error.args = (text,)
        return error

    def __str__(self) -> str:
        return self.args[0]


def _listed(problem: str, names: list[str], limit: int) -> str:
    shown = ", ".join(names[:limit])
    if len(names) > limit:
        shown += f" ... and {len(names) - limit} more"
    return f"{problem} ({len(names)}): {shown}"
