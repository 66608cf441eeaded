"""Errors raised by the Hugging Face bridge.

Every error carries the *culprit* (a file, a tensor name or a config field) both
as an attribute and inside its message, because conversions run unattended on
multi-gigabyte checkpoints and "shape mismatch" without a name is useless in a
log.  The classes are deliberately independent of the plugtron core package so
that the bridge can be imported (and unit tested) on its own.
"""

from __future__ import annotations

from pathlib import Path


class ConversionError(Exception):
    """Base class of every error the bridge raises on purpose."""


class CheckpointFormatError(ConversionError):
    """A checkpoint file or directory is missing, truncated, unsafe or malformed.

    ``path`` is the offending file or directory.
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


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


class MappingError(ConversionError):
    """Tensors cannot be mapped between the HF and megatron layouts.

    ``tensor`` names the HF or megatron tensor concerned.
    """

    def __init__(self, tensor: str, problem: str) -> None:
        self.tensor = tensor
        self.problem = problem
        super().__init__(f"tensor '{tensor}': {problem}")


class UnsupportedConfigError(ConversionError):
    """A config value changes the model's numbers in a way we cannot reproduce.

    ``field`` names the config key (dotted for nested keys, e.g.
    ``rope_parameters.low_freq_factor``).
    """

    def __init__(self, field: str, problem: str, *, source: str | None = None) -> None:
        self.field = field
        self.problem = problem
        self.source = source
        where = f" in {source}" if source else ""
        super().__init__(f"config field '{field}'{where}: {problem}")
