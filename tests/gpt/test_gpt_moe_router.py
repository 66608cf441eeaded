"""megatron's top-k router against an independent reference written from the routing math.

For each token with router logits ``x`` over ``E`` experts:

* score ``s``: ``softmax(x)`` (pre-softmax), ``x`` itself (softmax after top-k)
  or ``sigmoid(x)``;
* selection score ``s + b`` with the aux-loss-free expert bias ``b`` (sigmoid),
  else ``s``;
* group-limited routing (DeepSeek-V2/V3): experts form ``G`` equal contiguous
  groups, a group's score is the sum of its two best selection scores, only the
  best ``group_topk`` groups stay eligible;
* the ``k`` best eligible experts are chosen; their weights are the softmax of
  their logits (softmax after top-k), their pre-softmax probabilities, or
  their sigmoid scores divided by their sum (for k > 1);
* weights are multiplied by the routed scaling factor.

The reference loops over tokens in float64 and shares no code with megatron.
DeepSeek's group score is the sum of the top *two*; megatron sums the top
``topk // group_topk``, the same number in every grouped case below.
"""

from __future__ import annotations

import math

import pytest
import torch

E, T = 8, 64


def reference(logits: torch.Tensor, k: int, *, score: str, pre_softmax: bool = False, scale: float | None = None,
              bias: torch.Tensor | None = None, groups: int | None = None, group_topk: int | None = None):
    probs = torch.zeros(logits.shape, dtype=torch.float64)
    for t, row in enumerate(logits.double()):
        if score == "softmax":
            s = torch.softmax(row, dim=0) if pre_softmax else row
        else:
            s = torch.sigmoid(row)
        chooser = s + bias.double() if bias is not None else s
        eligible = list(range(E))
        if groups:
            size = E // groups
            group_score = [sum(sorted(chooser[g * size:(g + 1) * size].tolist(), reverse=True)[:2]) for g in range(groups)]
            best = sorted(range(groups), key=lambda g: -group_score[g])[:group_topk]
            eligible = [e for e in eligible if e // size in best]
        chosen = sorted(eligible, key=lambda e: -chooser[e].item())[:k]
        if score == "softmax" and not pre_softmax:
            weights = torch.softmax(row[chosen], dim=0)
        elif score == "softmax":
            weights = s[chosen]
        else:
            weights = s[chosen] / s[chosen].sum() if k > 1 else s[chosen]
        probs[t, chosen] = weights * (scale or 1.0)
    return probs, probs > 0


VARIANTS = {
    "softmax after top-k (Mixtral)": dict(k=2, score="softmax"),
    "softmax before top-k": dict(k=2, score="softmax", pre_softmax=True),
    "softmax, top-1 (pre-softmax)": dict(k=1, score="softmax", pre_softmax=True),
    "softmax with scaling": dict(k=2, score="softmax", scale=2.5),
    "sigmoid": dict(k=2, score="sigmoid"),
    "sigmoid, top-1": dict(k=1, score="sigmoid"),
    "sigmoid with expert bias": dict(k=2, score="sigmoid", bias=True),
    "groups, softmax before top-k": dict(k=4, score="softmax", pre_softmax=True, groups=4, group_topk=2),
    "DeepSeek-V3: sigmoid, bias, groups, scaling": dict(k=4, score="sigmoid", bias=True, groups=4, group_topk=2, scale=2.5),
}


def make_router(variant: dict):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.router import TopKRouter

    from plugtron_gpt.config import GPTModelConfig

    fields = dict(
        num_layers=1, hidden_size=16, num_attention_heads=2, vocab_size=32, use_cpu_initialization=True,
        num_moe_experts=E, moe_router_topk=variant["k"], moe_router_score_function=variant["score"],
        moe_router_pre_softmax=variant.get("pre_softmax", False), moe_router_topk_scaling_factor=variant.get("scale"),
        moe_router_enable_expert_bias=bool(variant.get("bias")),
        moe_router_num_groups=variant.get("groups"), moe_router_group_topk=variant.get("group_topk"),
    )
    config = GPTModelConfig(**{k: v for k, v in fields.items() if v is not None}).finalize()
    return TopKRouter(config=config.transformer, pg_collection=ProcessGroupCollection.use_mpu_process_groups()).eval()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_router_matches_the_reference(plugtron_single_rank, name: str) -> None:
    variant = VARIANTS[name]
    router = make_router(variant)
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(T, E, generator=gen) * 2
    bias = None
    if variant.get("bias"):
        bias = torch.randn(E, generator=gen) * 0.3
        router.expert_bias.copy_(bias)
    with torch.no_grad():
        probs, routing_map = router.routing(logits.view(T, 1, E))
    expected, expected_map = reference(
        logits, variant["k"], score=variant["score"], pre_softmax=variant.get("pre_softmax", False),
        scale=variant.get("scale"), bias=bias, groups=variant.get("groups"), group_topk=variant.get("group_topk"),
    )
    assert torch.equal(routing_map, expected_map), f"{name}: different experts chosen"
    torch.testing.assert_close(probs.double(), expected, rtol=1e-6, atol=1e-6)
    per_token = routing_map.sum(dim=1)
    assert torch.equal(per_token, torch.full((T,), variant["k"]))
    renormalised = variant["k"] > 1 if variant["score"] == "sigmoid" else not variant.get("pre_softmax")
    if renormalised:  # the chosen weights of a token add up to the scaling factor
        assert torch.allclose(probs.sum(dim=1).double(), torch.full((T,), variant.get("scale") or 1.0, dtype=torch.float64))


def test_the_expert_bias_changes_the_choice_not_the_weights(plugtron_single_rank) -> None:
    """Aux-loss-free balancing: the bias steers selection only; weights stay the plain sigmoid scores."""
    router = make_router(dict(k=2, score="sigmoid", bias=True))
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, unbiased = router.routing(logits.view(T, 1, E))
        router.expert_bias.copy_(torch.tensor([5.0] + [0.0] * (E - 1)))
        probs, biased = router.routing(logits.view(T, 1, E))
    assert biased[:, 0].all() and not unbiased[:, 0].all()
    scores = torch.sigmoid(logits)
    chosen = scores * biased
    torch.testing.assert_close(probs, chosen / chosen.sum(dim=1, keepdim=True))


def test_reference_group_score_is_deepseeks(plugtron_single_rank) -> None:
    """Where megatron's group score (top topk // group_topk) differs from DeepSeek's (top 2), the choice can differ.

    With topk=3 and group_topk=1 megatron ranks groups by their top 3; this is
    why the HF bridge must refuse such checkpoints (see the project notes).
    """
    variant = dict(k=3, score="sigmoid", groups=2, group_topk=1)
    router = make_router(variant)
    # group 0: 0.9, 0.9, 0.0, 0.0 (top-2 1.8, top-3 1.8); group 1: 0.85, 0.85, 0.85, 0 (top-2 1.7, top-3 2.55)
    scores = torch.tensor([[0.9, 0.9, 1e-4, 1e-4, 0.85, 0.85, 0.85, 1e-4]])
    logits = torch.log(scores / (1 - scores))
    with torch.no_grad():
        _, megatron_map = router.routing(logits.view(1, 1, E))
    _, deepseek_map = reference(logits, 3, score="sigmoid", groups=2, group_topk=1)
    assert megatron_map[0, 4:7].all() and deepseek_map[0, :2].all()
    assert math.isclose(float(scores[0, :2].sum()), 1.8, rel_tol=1e-6)
