"""The errors a weight conversion raises about its *inputs*: a config or a tensor table.

They live in the core because both sides of a conversion raise them: the
family's architecture modules (config translation, tensor tables) and the
format engines that read and write checkpoints. Import-light: no torch.
"""

from __future__ import annotations

from plugtron.errors import PlugtronError


class ConversionError(PlugtronError):
    """A checkpoint cannot be converted; the message names the culprit."""


class MappingError(ConversionError):
    """Tensors cannot be mapped between the source and megatron layouts.

    ``tensor`` names the source or megatron tensor concerned.
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
