"""Weight-conversion vocabulary shared by the families and the format engines.

Plugins import the core and never each other, so what both a family's
architecture modules and a conversion engine (``plugtron-hf-bridge``) need
lives here, torch-free at import:

- :mod:`.table`: tensor tables (:class:`Rule`, :class:`Table`, the kind
  constructors, :func:`expand` into :class:`TensorMapping` objects);
- :mod:`.packing`: the pure-torch repackings the kinds use;
- :mod:`.pieces`: where each megatron row lives in the source, so a rank
  reads only its shard;
- :mod:`.hf_keys`: strict reading of Hugging Face ``config.json`` files;
- :mod:`.errors`: :class:`ConversionError`, :class:`MappingError`,
  :class:`UnsupportedConfigError`.

The engines themselves (safetensors streaming, writers, verification,
distributed checkpoints) stay in their plugins.
"""

from __future__ import annotations

from .errors import ConversionError, MappingError, UnsupportedConfigError
from .hf_keys import BOOL, FLOAT, INT, OPT_FLOAT, OPT_INT, STR
from .hf_keys import NON_NUMERIC_KEYS, ConfigReader, ConfigSchema
from .pieces import Piece
from .table import (
    Rule,
    Table,
    TensorMapping,
    direct,
    expand,
    for_layers,
    fused_gate_up,
    fused_qkv,
    gated_fc1,
    grouped_qkv,
    layer,
    table,
    transposed,
    transposed_qkv,
    vocab_rows,
)

__all__ = [
    "BOOL", "FLOAT", "INT", "OPT_FLOAT", "OPT_INT", "STR", "NON_NUMERIC_KEYS", "ConfigReader", "ConfigSchema", "ConversionError", "MappingError", "Piece", "Rule",
    "Table", "TensorMapping", "UnsupportedConfigError", "direct", "expand", "for_layers", "fused_gate_up", "fused_qkv",
    "gated_fc1", "grouped_qkv", "layer", "table", "transposed", "transposed_qkv", "vocab_rows",
]
