"""Exception types. Every message names its culprit: plugin, distribution, field, file."""

from __future__ import annotations


def _rebuild(cls: type, args: tuple, state: dict) -> "PlugtronError":
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class PlugtronError(Exception):
    """Base class of every error plugtron raises on purpose.

    Picklable whatever a subclass's constructor takes (torch sends a rank's
    exception to the others by pickling it): rebuilt from its message and
    attributes, without calling ``__init__`` again.
    """

    def __reduce__(self) -> tuple:
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


class PluginError(PlugtronError):
    """A plugin could not be loaded or broke a registration rule."""


class DuplicateRegistrationError(PluginError):
    """Two plugins claim the same family, layer spec or converter."""


class UnknownFamilyError(PlugtronError):
    """A config or command names a model family no plugin provides."""


class LayerSpecError(PlugtronError):
    """A requested layer spec does not exist or is unavailable here."""


class ConfigError(PlugtronError, ValueError):
    """A config field breaks a rule. ``field`` names it, ``rule`` says why."""

    def __init__(self, field: str, rule: str, *, config: str | None = None) -> None:
        self.field = field
        self.rule = rule
        where = f"{config}." if config else ""
        super().__init__(f"config field '{where}{field}': {rule}")


class PipelineError(PlugtronError):
    """The build pipeline was asked for something it cannot do here."""


class OutputError(PlugtronError):
    """An output path cannot be written as asked (exists, lies inside the source, parent not writable).

    ``path`` names the destination; nothing has been written to it.
    """

    def __init__(self, path: object, problem: str) -> None:
        from pathlib import Path

        self.path = Path(str(path))
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
