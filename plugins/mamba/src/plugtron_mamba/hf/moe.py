"""NemotronH's MoE (``moe`` / ``E``) layers <-> megatron's MoELayer fields.

What transformers 5.23's NemotronH computes in a ``moe`` layer (checked
against ``modeling_nemotron_h.py``), and the megatron field each part becomes:

================================  ==============================================================
transformers                      megatron (``MambaModelConfig`` / TransformerConfig)
================================  ==============================================================
``n_routed_experts``              ``num_moe_experts``
``num_experts_per_tok``           ``moe_router_topk``
router: ``sigmoid(x W^T)`` in     ``moe_router_score_function='sigmoid'``, ``moe_router_dtype='fp32'``
float32
``e_score_correction_bias``       ``moe_router_enable_expert_bias`` (always: the buffer always exists)
(selection only, not weights)
``n_group`` / ``topk_group``      ``moe_router_num_groups`` / ``moe_router_group_topk`` (none when
                                  every group is kept)
``norm_topk_prob``                megatron renormalises the top-k sigmoid scores exactly when
                                  ``moe_router_topk > 1`` (``moe_utils.py:722``)
``routed_scaling_factor``         ``moe_router_topk_scaling_factor``
experts ``down(relu2(up(x)))``    SequentialMLP experts, ``gated_linear_unit=False``,
                                  ``activation_func`` squared_relu, ``moe_ffn_hidden_size``
                                  = ``moe_intermediate_size``
shared expert (always present,    ``moe_shared_expert_intermediate_size`` (no gate)
same activation, added)
``moe_latent_size``               refused: megatron builds its latent projections only with TE
================================  ==============================================================

What megatron cannot express is refused naming the key and value:

* ``norm_topk_prob`` != ``(num_experts_per_tok > 1)``;
* group-limited routing whose group score differs: transformers scores a
  group by the sum of its top-2 experts, megatron by its top
  ``topk // group_topk`` (``moe_utils.py:554``), equal only when that is 2;
* ``moe_latent_size`` set (see above);
* ``moe_shared_expert_intermediate_size`` <= 0.

Not read by transformers' forward (so not numeric): ``n_shared_experts``
(the shared MLP's width is ``moe_shared_expert_intermediate_size``),
``moe_shared_expert_overlap`` (a scheduling choice), ``output_router_logits``
(auxiliary loss outputs only).
"""

from __future__ import annotations

from typing import Any

#: Keys of MoE layers that transformers' forward does not read, with why.
MOE_IGNORED = {
    "n_shared_experts": "not read by transformers: the shared expert's width is moe_shared_expert_intermediate_size",
    "moe_shared_expert_overlap": "a scheduling choice, not a different function",
    "output_router_logits": "returns router logits for an auxiliary loss; logits unchanged",
}
_MOE_KEYS = ("n_routed_experts", "moe_intermediate_size", "moe_shared_expert_intermediate_size", "moe_latent_size",
             "num_experts_per_tok", "routed_scaling_factor", "n_group", "topk_group", "norm_topk_prob")


def _errors() -> Any:
    from plugtron.conversion import errors

    return errors


def moe_fields_from_hf(r: Any, pattern: str) -> dict[str, Any]:
    """megatron MoE fields for a NemotronH config (``r``: the config reader); none without ``moe`` layers."""
    if "E" not in pattern:
        r.used.update(_MOE_KEYS)  # only moe layers read them
        return {}
    experts, topk = r.get("n_routed_experts"), r.get("num_experts_per_tok")
    if not isinstance(experts, int) or experts < 1:
        raise r.fail("n_routed_experts", f"is {experts!r}; moe layers need at least one routed expert")
    if not isinstance(topk, int) or not 1 <= topk <= experts:
        raise r.fail("num_experts_per_tok", f"is {topk!r}; it must be between 1 and n_routed_experts={experts}")
    norm = bool(r.get("norm_topk_prob"))
    if norm != (topk > 1):
        why = ("megatron always renormalises the selected sigmoid scores when more than one expert is chosen "
               "(moe_utils.py:722)" if topk > 1 else
               "with one expert transformers divides its score by itself (weight 1); megatron keeps the sigmoid score")
        raise r.fail("norm_topk_prob", f"is {norm} with num_experts_per_tok={topk}; {why}")
    latent = r.get("moe_latent_size")
    if latent is not None:
        raise r.fail("moe_latent_size", f"is {latent}; megatron-core 0.16.1 builds MoE latent projections only as "
                                        "transformer-engine TELinear (moe_layer.py:171), not in the mamba family's spec")
    shared = r.get("moe_shared_expert_intermediate_size")
    if not isinstance(shared, int) or shared < 1:
        raise r.fail("moe_shared_expert_intermediate_size", f"is {shared!r}; NemotronH always has a shared expert")
    return {
        "num_moe_experts": experts, "moe_router_topk": topk, "moe_ffn_hidden_size": r.get("moe_intermediate_size"),
        "moe_shared_expert_intermediate_size": shared, "moe_router_score_function": "sigmoid",
        "moe_router_enable_expert_bias": True, "moe_router_pre_softmax": False, "moe_router_dtype": "fp32",
        "moe_router_topk_scaling_factor": float(r.get("routed_scaling_factor")), **_groups(r, experts, topk),
    }


def _groups(r: Any, experts: int, topk: int) -> dict[str, Any]:
    groups, group_topk = r.get("n_group"), r.get("topk_group")
    if not isinstance(groups, int) or groups < 1 or experts % groups:
        raise r.fail("n_group", f"is {groups!r}; it must divide n_routed_experts={experts}")
    if not isinstance(group_topk, int) or not 1 <= group_topk <= groups:
        raise r.fail("topk_group", f"is {group_topk!r}; it must be between 1 and n_group={groups}")
    if group_topk == groups:  # every group kept: no group limit in either model
        return {}
    if topk // group_topk != 2:
        raise r.fail("topk_group", f"is {group_topk} with num_experts_per_tok={topk}: transformers scores a group by "
                                   f"its top-2 experts, megatron by its top num_experts_per_tok // topk_group = "
                                   f"{topk // group_topk} (moe_utils.py:554); equal only when that is 2")
    return {"moe_router_num_groups": groups, "moe_router_group_topk": group_topk}


def _require(config: Any, key: str, allowed: tuple[Any, ...]) -> Any:
    value = getattr(config, key)
    if value not in allowed:
        shown = " or ".join(repr(a) for a in allowed)
        raise _errors().UnsupportedConfigError(key, f"is {value!r}; NemotronHForCausalLM's moe layers can only express {shown}")
    return value


def moe_fields_to_hf(config: Any, pattern: str) -> dict[str, Any]:
    """NemotronHConfig keywords for the MoE fields; refuses what NemotronH's moe layer cannot compute."""
    if "E" not in pattern:
        _require(config, "num_moe_experts", (None, 0))
        return {}
    _require(config, "moe_router_score_function", ("sigmoid",))
    _require(config, "moe_router_enable_expert_bias", (True,))
    _require(config, "moe_router_pre_softmax", (False,))
    _require(config, "moe_shared_expert_gate", (False,))
    _require(config, "moe_latent_size", (None,))
    _require(config, "moe_apply_probs_on_input", (False,))
    _require(config, "moe_expert_capacity_factor", (None,))
    _require(config, "moe_input_jitter_eps", (None,))
    shared = config.moe_shared_expert_intermediate_size
    if not shared:
        raise _errors().UnsupportedConfigError("moe_shared_expert_intermediate_size", f"is {shared!r}; NemotronH's moe layers always have a shared expert")
    experts, topk = config.num_moe_experts, config.moe_router_topk
    groups, group_topk = config.moe_router_num_groups, config.moe_router_group_topk
    if groups is not None and groups != group_topk and topk // group_topk != 2:
        raise _errors().UnsupportedConfigError(
            "moe_router_group_topk", f"is {group_topk} with moe_router_topk={topk}: NemotronH scores a group by its "
                                     f"top-2 experts, megatron here by its top {topk // group_topk}")
    scaling = config.moe_router_topk_scaling_factor
    return {"n_routed_experts": experts, "num_experts_per_tok": topk, "norm_topk_prob": topk > 1,
            "moe_intermediate_size": config.moe_ffn_hidden_size or config.ffn_hidden_size,
            "moe_shared_expert_intermediate_size": shared, "moe_latent_size": None,
            "routed_scaling_factor": float(scaling) if scaling else 1.0,
            "n_group": groups or 1, "topk_group": group_topk or 1}
