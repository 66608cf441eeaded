"""The ``local`` layer spec of the toy family and its availability check."""

from __future__ import annotations

from typing import Any

from plugtron import Availability


def local_available() -> Availability:
    return Availability.yes("megatron-core modules only, runs on CPU and GPU")


def local_spec(config: Any) -> Any:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec()
