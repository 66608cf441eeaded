"""plugtron's errors travel between ranks (torch pickles them) and keep what they name."""

from __future__ import annotations

import pickle

import pytest

from plugtron.errors import ConfigError, OutputError, PlugtronError
from plugtron.untrusted import UntrustedFileError, parse_json_strict
from plugtron_hf_bridge.errors import CheckpointFormatError, TensorNotFoundError, TensorSetError


@pytest.mark.parametrize("error", [
    PlugtronError("plain"),
    ConfigError("num_layers", "must be positive", config="GPTModelConfig"),
    OutputError("/out", "output already exists"),
    UntrustedFileError("/ckpt/config.json", "is a link to /dev/zero"),
    CheckpointFormatError("/ckpt/weights/.metadata", "refusing to unpickle global 'posix.system'"),
    TensorNotFoundError("/ckpt", "model.norm.weight", "renamed?"),
    TensorSetError("missing", ["a.weight", "b.weight"]),
], ids=lambda e: type(e).__name__)
def test_errors_survive_pickling_with_message_and_attributes(error: PlugtronError) -> None:
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error)
    assert str(again) == str(error)
    assert vars(again) == vars(error)


def test_deeply_nested_json_is_a_named_error_not_a_recursion_traceback() -> None:
    with pytest.raises(UntrustedFileError, match="bomb.json"):
        parse_json_strict("[" * 100_000 + "]" * 100_000, "bomb.json")
