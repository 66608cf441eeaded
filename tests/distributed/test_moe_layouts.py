"""Mixture-of-Experts and Multi-Latent Attention: same weights in expert-parallel layouts, same numbers.

One 2-rank job (:mod:`plugtron.parity`) runs every scenario against a
single-process reference: logits, loss, every gradient (expert by expert,
under global names), the MoE auxiliary losses, the MTP loss and the
aux-loss-free expert bias after its update, under plain backward and under
megatron DDP. Two references: a Mixtral-style model (alltoall dispatcher,
softmax top-2, aux + z loss) and a DeepSeek-V3-style one (MLA with YaRN, a
dense first layer, shared expert with gate, sigmoid routing with expert bias,
group-limited top-k, sequence aux loss, allgather dispatcher, one MTP layer),
and four-layer versions of both for PP=2 x VP=2 (the MTP layer on the last
virtual stage). FSDP2 scenarios shard the experts over the
expert-data-parallel group (EP=2: dp=2, edp=1; plain dp=2: edp=2; TP=2 ETP=1:
dp=1, edp=2).

Each trap of the project notes has a scenario that rebuilds the known-wrong
construction (``tests/distributed/moe_traps.py``) and must *not* match.

A second, 4-rank job covers the layouts that need four ranks: TP=2 x ETP=2 x
EP=2 (where megatron gathers uneven splits, which gloo cannot do without the
CPU runtime's padding), EP=2 x PP=2, and EP=2 under FSDP2 with dp=4, edp=2.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from plugtron import parity

pytestmark = pytest.mark.multiprocess

HERE = Path(__file__).resolve().parent
TRAPS = "moe_traps:"
BASE = dict(
    num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, vocab_size=128,
    make_vocab_size_divisible_by=64, seq_length=16, hidden_dropout=0.0, attention_dropout=0.0,
    use_cpu_initialization=True, normalization="RMSNorm", gated_linear_unit=True, add_bias_linear=False,
    layer_spec="torch",
)
MLA = dict(multi_latent_attention=True, q_lora_rank=32, kv_lora_rank=16, qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16, qk_layernorm=True)
REFERENCES = {
    "mixtral": dict(
        num_query_groups=2, num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=64,
        moe_token_dispatcher_type="alltoall", moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001,
    ),
    "deepseek": dict(
        MLA, position_embedding_type="yarn", yarn_rotary_scaling_factor=40.0, yarn_mscale_all_dim=1.0,
        yarn_original_max_position_embeddings=16, num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=32,
        moe_layer_freq=[0, 1], moe_shared_expert_intermediate_size=32, moe_shared_expert_gate=True,
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_router_bias_update_rate=0.01,
        moe_router_num_groups=4, moe_router_group_topk=2, moe_router_topk_scaling_factor=2.5,
        moe_token_dispatcher_type="allgather", moe_aux_loss_coeff=0.0001, moe_router_load_balancing_type="seq_aux_loss",
        mtp_num_layers=1,
    ),
    "mla": dict(MLA),  # dense MLA: megatron refuses MoE without sequence parallelism, MLA alone builds
}
# Four layers for PP=2 x VP=2 (one layer per virtual stage); the DeepSeek one keeps a dense first layer,
# and its MTP layer sits on the last virtual stage of the last pipeline rank.
REFERENCES["mixtral4"] = dict(REFERENCES["mixtral"], num_layers=4)
REFERENCES["deepseek4"] = dict(REFERENCES["deepseek"], num_layers=4, moe_layer_freq=[0, 1, 1, 1])
LAYOUTS = [
    dict(ep=2, wrap="ddp"),  # EP takes the data-parallel ranks: dp=2, so DDP
    dict(tp=2, etp=1), dict(tp=2, etp=1, wrap="ddp"),
    dict(tp=2, etp=2), dict(tp=2, etp=2, wrap="ddp"),
    dict(tp=2, ep=2, etp=1), dict(tp=2, ep=2, etp=1, wrap="ddp"),
    dict(pp=2), dict(pp=2, wrap="ddp"),
]
SCENARIOS = [
    dict(name=f"{ref} " + " ".join(f"{k}={v}" for k, v in layout.items()), ref=ref, **layout)
    for ref in ("mixtral", "deepseek") for layout in LAYOUTS
] + [
    dict(name="mla tp=2", ref="mla", tp=2),
] + [
    dict(name=f"{ref} pp=2 vp=2" + (" wrap=ddp" if wrap else ""), ref=ref, pp=2, vp=2, **({"wrap": wrap} if wrap else {}))
    for ref in ("mixtral4", "deepseek4") for wrap in (None, "ddp")
] + [
    # FSDP2: experts are units of their own over the expert-data-parallel group (pipeline/wrap.py)
    dict(name="mixtral ep=2 wrap=fsdp2", ref="mixtral", ep=2, wrap="fsdp2"),  # dp=2, edp=1
    dict(name="mixtral wrap=fsdp2", ref="mixtral", wrap="fsdp2"),  # dp=2, edp=2
    dict(name="deepseek ep=2 wrap=fsdp2", ref="deepseek", ep=2, wrap="fsdp2"),
    dict(name="deepseek tp=2 etp=1 wrap=fsdp2", ref="deepseek", tp=2, etp=1, wrap="fsdp2"),  # dp=1, edp=2: a sum
]
TRAP_SCENARIOS = [
    dict(name="trap: megatron DDP, experts at EP=1 over the dense DP group", ref="mixtral", tp=2, etp=1, wrap="ddp",
         setup=TRAPS + "ddp_without_expert_data_parallel"),
    dict(name="trap: plain chunks without the expert-DP sum", ref="mixtral", tp=2, etp=1,
         setup=TRAPS + "plain_without_expert_grad_sum"),
    dict(name="trap: MLA with column-parallel down projections", ref="mla", tp=2,
         setup=TRAPS + "mla_column_parallel_down_projections"),
    dict(name="trap: MLA without sequence parallelism", ref="mla", tp=2, setup=TRAPS + "mla_without_sequence_parallel"),
    dict(name="trap: FSDP2 experts divided by their own group's size", ref="mixtral", ep=2, wrap="fsdp2",
         setup=TRAPS + "fsdp2_default_expert_divide_factor"),
]


FOUR_RANKS = [
    dict(name=f"{ref} " + " ".join(f"{k}={v}" for k, v in layout.items()), ref=ref, **layout)
    for ref in ("mixtral", "deepseek")
    for layout in (dict(tp=2, ep=2, etp=2, wrap="ddp"), dict(ep=2, pp=2, wrap="ddp"))
] + [
    dict(name="mixtral ep=2 wrap=fsdp2", ref="mixtral", ep=2, wrap="fsdp2"),  # dp=4, edp=2: divided by 4, reduced over 2
]


@pytest.fixture(scope="module")
def references() -> dict:
    from plugtron_gpt.config import GPTModelConfig

    return {
        name: parity.reference(GPTModelConfig(**{**BASE, **fields}, activation_func=torch.nn.functional.silu))
        for name, fields in REFERENCES.items()
    }


@pytest.fixture(scope="module")
def results(references, tmp_path_factory) -> dict:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))  # the trap module
        out = parity.run(references, SCENARIOS + TRAP_SCENARIOS, tmp_path_factory.mktemp("moe_layouts"))
    out["_references"] = references
    return out


@pytest.fixture(scope="module")
def results4(references, tmp_path_factory) -> dict:
    used = {s["ref"] for s in FOUR_RANKS}
    out = parity.run({k: v for k, v in references.items() if k in used}, FOUR_RANKS, tmp_path_factory.mktemp("moe4"), nproc=4)
    out["_references"] = references
    return out


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s["name"] for s in SCENARIOS])
def test_layout_matches_single_process(results, scenario: dict) -> None:
    check(results, scenario, world=2)


@pytest.mark.parametrize("scenario", FOUR_RANKS, ids=[s["name"] for s in FOUR_RANKS])
def test_four_rank_layout_matches_single_process(results4, scenario: dict) -> None:
    check(results4, scenario, world=4)


def check(results: dict, scenario: dict, world: int) -> None:
    result, ref = results[scenario["name"]], results["_references"][scenario["ref"]]
    assert result["params_checked"] > 0
    assert result["loss"] == pytest.approx(result["ref_loss"], abs=1e-6), result
    assert result["max_grad_diff"] < 1e-6, result
    if world // (scenario.get("tp", 1) * scenario.get("pp", 1)) == 1:  # data-parallel runs split the batches
        assert result["max_logits_diff"] is not None and result["max_logits_diff"] < 1e-6, result
    if scenario.get("vp"):  # every parameter lives on one (rank, virtual stage), MTP's embedding copy on the last too
        assert result["params_checked"] == len(ref["state"]) + (ref["mtp_loss"] is not None), result
    if ref["aux_losses"]:
        assert result["max_aux_loss_diff"] < 1e-6, result
    if ref["mtp_loss"] is not None:
        assert result["mtp_loss_diff"] < 1e-6, result
    if ref["expert_bias"]:
        assert result["max_expert_bias_diff"] == 0.0, result


def test_references_exercise_what_they_claim(results) -> None:
    refs = results["_references"]
    assert set(refs["mixtral"]["aux_losses"]) == {"load_balancing_loss", "z_loss"}
    assert set(refs["deepseek"]["aux_losses"]) == {"seq_load_balancing_loss"} and refs["deepseek"]["mtp_loss"] > 0
    biases = refs["deepseek"]["expert_bias"]
    assert biases and all(b.abs().sum() > 0 for b in biases.values()), "the expert bias moved in the reference step"
    expert_grads = [g for n, g in refs["mixtral"]["grads"].items() if ".mlp.experts.local_experts." in n]
    assert len(expert_grads) == 2 * 4 * 2 and all(g.abs().sum() > 0 for g in expert_grads), "every expert got tokens"


@pytest.mark.parametrize("trap", TRAP_SCENARIOS, ids=[t["name"] for t in TRAP_SCENARIOS])
def test_each_trap_gives_wrong_gradients(results, trap: dict) -> None:
    """Logits and loss stay right; only a gradient comparison sees it (as the notes measured)."""
    result = results[trap["name"]]
    assert result["loss"] == pytest.approx(result["ref_loss"], abs=1e-6)
    assert result["max_grad_diff"] > 2e-5, result  # the exact layouts stay below 1e-6
    wrong = "mlp.experts" if trap["ref"] == "mixtral" else "self_attention.linear_kv_down_proj"
    assert wrong in result["worst"], result
