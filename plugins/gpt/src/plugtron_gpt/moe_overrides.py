"""Plugins' replacements of the GPT family's MoE router and experts (hook ``plugtron_moe_submodules``).

The replacements are applied to the *spec* the chosen layer-spec factory
returned, not inside the factories: so they reach every layer spec (``torch``,
``local``, ``te``, a third party's), the MTP layers (built from the same
spec), and a spec factory never needs the plugin manager. megatron's layer
specs share one MoE spec object between layers; it is copied, never changed
in place, so a spec cached elsewhere is left as it was.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from plugtron.errors import LayerSpecError
from plugtron.records import resolve

if TYPE_CHECKING:
    from plugtron.facade import Replacement


def _moe_submodules_type() -> type:
    from megatron.core.transformer.moe.moe_layer import MoESubmodules

    return MoESubmodules


def parts() -> tuple[str, ...]:
    """The replaceable parts: megatron's ``MoESubmodules`` fields (router, experts, shared_experts)."""
    return tuple(f.name for f in dataclasses.fields(_moe_submodules_type()))


def _value(part: str, replacement: "Replacement", default: Any, config: Any) -> Any:
    """The object megatron receives for ``part``: resolved, checked, a bare expert class given the default's linears."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    who = f"plugin '{replacement.plugin}' (plugtron_moe_submodules)"
    value = replacement.value
    if isinstance(value, str):
        try:
            value = resolve(value)
        except (ImportError, AttributeError, ValueError) as exc:
            raise LayerSpecError(f"{who}: the MoE {part!r} {replacement.value!r} does not import: {exc}") from exc
    if part == "shared_experts" and not config.moe_shared_expert_intermediate_size:
        raise LayerSpecError(f"{who} replaces the shared experts, but the config has none (moe_shared_expert_intermediate_size is unset): it would be ignored")
    if not (callable(value) or isinstance(value, ModuleSpec)):
        raise LayerSpecError(f"{who}: the MoE {part!r} must be a class, a ModuleSpec or an import path, not {type(value).__name__}")
    if part != "router" and isinstance(value, type) and isinstance(default, ModuleSpec):
        return ModuleSpec(module=value, params=dict(default.params), submodules=default.submodules)
    return value


def check_parts(replacements: "dict[str, Replacement]") -> None:
    """Every part a plugin named exists in megatron's MoE layer (a typo would otherwise be ignored)."""
    known = parts()
    for part, replacement in replacements.items():
        if part not in known:
            raise LayerSpecError(
                f"plugin '{replacement.plugin}' (plugtron_moe_submodules) returned an unknown MoE part {part!r}; "
                f"megatron's MoE layer has {', '.join(known)}"
            )


def _replace_moe(mlp: Any, replacements: "dict[str, Replacement]", config: Any) -> Any:
    from megatron.core.transformer.spec_utils import ModuleSpec

    if not isinstance(mlp, ModuleSpec) or not isinstance(mlp.submodules, _moe_submodules_type()):
        return mlp
    changes = {part: _value(part, r, getattr(mlp.submodules, part), config) for part, r in replacements.items()}
    return dataclasses.replace(mlp, submodules=dataclasses.replace(mlp.submodules, **changes))


def _replace_layer(layer: Any, replacements: "dict[str, Replacement]", config: Any, memo: dict[int, Any]) -> Any:
    """A copy of a layer spec with its MoE parts replaced (the same copy for layer specs shared between layers)."""
    if id(layer) in memo:
        return memo[id(layer)]
    submodules = getattr(layer, "submodules", None)
    mlp = getattr(submodules, "mlp", None)
    new_mlp = _replace_moe(mlp, replacements, config) if mlp is not None else None
    result = layer if new_mlp is mlp else dataclasses.replace(layer, submodules=dataclasses.replace(submodules, mlp=new_mlp))
    memo[id(layer)] = result
    return result


def apply(spec: Any, replacements: "dict[str, Replacement]", config: Any) -> Any:
    """``spec`` (a layer spec or a block spec) with every MoE layer's named parts replaced."""
    if not replacements:
        return spec
    check_parts(replacements)
    memo: dict[int, Any] = {}
    layers = getattr(spec, "layer_specs", None)
    if layers is None:
        return _replace_layer(spec, replacements, config, memo)
    return dataclasses.replace(spec, layer_specs=[_replace_layer(layer, replacements, config, memo) for layer in layers])
