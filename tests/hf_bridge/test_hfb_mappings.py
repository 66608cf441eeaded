"""Tensor tables and repacking: bit-exact round trips, layout semantics, strict name use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from plugtron.config.base import padded_vocab_size
from plugtron_hf_bridge.errors import MappingError
from plugtron_hf_bridge.hf_config import from_megatron_fields, to_megatron_fields
from plugtron_hf_bridge.mappings import (
    check_hf_names,
    expected_hf_names,
    gpt2_c_attn_to_qkv,
    hf_to_megatron,
    mapping_for,
    megatron_to_hf,
    pack_gate_up,
    pack_qkv,
    unpack_gate_up,
    unpack_qkv,
)
from plugtron._atomic import atomic_output_dir
from plugtron_hf_bridge.safetensors_io import SafetensorsCheckpoint, ShardedSafetensorsWriter

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=100, max_position_embeddings=128)
MODELS = {
    "llama": ("LlamaForCausalLM", lambda: transformers.LlamaConfig(**SMALL)),
    "llama_bias": ("LlamaForCausalLM", lambda: transformers.LlamaConfig(**SMALL, attention_bias=True, mlp_bias=True)),
    "mistral": ("MistralForCausalLM", lambda: transformers.MistralConfig(**SMALL, sliding_window=None)),
    "qwen2": ("Qwen2ForCausalLM", lambda: transformers.Qwen2Config(**SMALL, tie_word_embeddings=True)),
    "qwen3": ("Qwen3ForCausalLM", lambda: transformers.Qwen3Config(**SMALL, head_dim=32)),
    "gpt2": ("GPT2LMHeadModel", lambda: transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100,
                                                                 n_positions=32, bos_token_id=0, eos_token_id=0)),
    "gpt2_untied": ("GPT2LMHeadModel", lambda: transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=60,
                                                                        n_positions=16, tie_word_embeddings=False,
                                                                        bos_token_id=0, eos_token_id=0)),
}


def tiny_model(key: str, dtype: torch.dtype = torch.float32):
    arch, make = MODELS[key]
    cfg = make()
    torch.manual_seed(0)
    model = getattr(transformers, arch)(cfg).to(dtype)
    with torch.no_grad():  # make every tensor (biases, norms) non-trivial so mix-ups show
        for p in model.parameters():
            p.normal_()
    d = cfg.to_dict()
    d["architectures"] = [arch]
    return arch, model, to_megatron_fields(d)


def hf_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items()}


@pytest.mark.parametrize("key", list(MODELS))
@pytest.mark.parametrize("te", [False, True])
def test_round_trip_bit_exact_and_every_name_used_once(key: str, te: bool) -> None:
    arch, model, fields = tiny_model(key, torch.bfloat16 if te else torch.float32)
    sd = hf_state(model)
    padded = padded_vocab_size(fields["vocab_size"], 64)
    maps = mapping_for(arch, fields, te_fused_norms=te, padded_vocab_size=padded)
    used = [n for m in maps for n in m.hf_names]
    assert len(used) == len(set(used)) and used == expected_hf_names(arch, fields, te)
    skipped = check_hf_names(maps, sd, fields)
    assert set(used) | set(skipped) == set(sd)
    assert skipped == (["lm_head.weight"] if fields["share_embeddings_and_output_weights"] else [])

    meg = dict(hf_to_megatron(maps, sd.__getitem__))
    assert len(meg) == len(maps)
    for m in maps:
        assert tuple(meg[m.megatron_name].shape) == m.megatron_shape
        assert meg[m.megatron_name].dtype == sd[m.hf_names[0]].dtype
    heads, groups, d, hidden = (fields[k] for k in ("num_attention_heads", "num_query_groups", "kv_channels", "hidden_size"))
    last = fields["num_layers"] - 1
    assert meg[f"decoder.layers.{last}.self_attention.linear_qkv.weight"].shape == ((heads + 2 * groups) * d, hidden)
    emb = meg["embedding.word_embeddings.weight"]
    assert emb.shape[0] == padded and not emb[fields["vocab_size"]:].any()
    norm = "self_attention.linear_qkv.layer_norm_weight" if te else "input_layernorm.weight"
    assert f"decoder.layers.0.{norm}" in meg
    assert ("output_layer.weight" in meg) != fields["share_embeddings_and_output_weights"]

    back = dict(megatron_to_hf(maps, meg.__getitem__))
    assert set(back) == set(used)
    for name, t in back.items():
        assert t.dtype == sd[name].dtype and torch.equal(t, sd[name]), name


def reference_pack(q, k, v, groups, d):
    """Row-by-row construction of megatron's layout, independent of pack_qkv's reshapes."""
    per_group = q.shape[0] // (groups * d)
    rows = []
    for g in range(groups):
        for h in range(per_group):
            rows += [q[(g * per_group + h) * d + i] for i in range(d)]
        rows += [k[g * d + i] for i in range(d)]
        rows += [v[g * d + i] for i in range(d)]
    return torch.stack(rows)


@settings(max_examples=40, deadline=None, database=None)
@given(groups=st.integers(1, 4), per_group=st.integers(1, 4), d=st.integers(1, 5), hidden=st.integers(1, 6),
       bias=st.booleans())
def test_pack_qkv_layout_and_inverse(groups: int, per_group: int, d: int, hidden: int, bias: bool) -> None:
    shape = (lambda rows: (rows,)) if bias else (lambda rows: (rows, hidden))
    q = torch.randn(shape(groups * per_group * d))
    k, v = torch.randn(shape(groups * d)), torch.randn(shape(groups * d))
    packed = pack_qkv(q, k, v, groups, d)
    assert torch.equal(packed, reference_pack(q, k, v, groups, d))
    for got, want in zip(unpack_qkv(packed, groups, d), (q, k, v)):
        assert torch.equal(got, want) and got.is_contiguous()


def test_gate_up_and_gpt2_c_attn_semantics() -> None:
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    fc1 = pack_gate_up(gate, up)
    assert torch.equal(fc1[:6], gate) and torch.equal(fc1[6:], up)
    assert all(torch.equal(a, b) for a, b in zip(unpack_gate_up(fc1), (gate, up)))
    heads, d = 3, 2
    hidden = heads * d
    c_attn = torch.randn(hidden, 3 * hidden)  # Conv1D: [in, out], out = [q | k | v]
    qkv = gpt2_c_attn_to_qkv(c_attn, heads, d)
    for h in range(heads):  # megatron: per head, [q_h; k_h; v_h] rows = Linear weights = Conv1D columns
        block = qkv[h * 3 * d:(h + 1) * 3 * d]
        for j, part in enumerate(range(3)):
            cols = c_attn[:, part * hidden + h * d: part * hidden + (h + 1) * d]
            assert torch.equal(block[j * d:(j + 1) * d], cols.t())


def test_shape_mismatch_names_the_tensor() -> None:
    arch, model, fields = tiny_model("llama")
    sd = hf_state(model)
    sd["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(3, 64)
    with pytest.raises(MappingError, match="model.layers.1.self_attn.k_proj.weight"):
        dict(hf_to_megatron(mapping_for(arch, fields), sd.__getitem__))
    maps = mapping_for(arch, fields)
    with pytest.raises(MappingError, match="embedding.word_embeddings.weight"):
        maps[0].to_hf(torch.zeros(7, 64))
    with pytest.raises(MappingError, match="word_embeddings"):
        mapping_for(arch, fields, padded_vocab_size=50)


def test_check_hf_names_is_strict() -> None:
    arch, model, fields = tiny_model("llama")
    maps = mapping_for(arch, fields)
    names = set(hf_state(model))
    assert check_hf_names(maps, names | {"model.layers.0.self_attn.rotary_emb.inv_freq"}, fields) == \
        ["model.layers.0.self_attn.rotary_emb.inv_freq"]
    with pytest.raises(MappingError, match="model.layers.0.mlp.extra_scale"):
        check_hf_names(maps, names | {"model.layers.0.mlp.extra_scale"}, fields)
    with pytest.raises(MappingError, match="model.norm.weight"):
        check_hf_names(maps, names - {"model.norm.weight"}, fields)
    with pytest.raises(MappingError, match="no tensor table"):
        mapping_for("BertForMaskedLM", fields)


@pytest.mark.parametrize("key", ["qwen3", "gpt2"])
def test_safetensors_import_export_through_transformers(key: str, tmp_path: Path, monkeypatch) -> None:
    """HF save_pretrained -> our reader -> megatron tensors -> our writer -> HF from_pretrained: same logits."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    arch, model, fields = tiny_model(key)
    model.eval().save_pretrained(tmp_path / "hf")
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert to_megatron_fields(hf_cfg) == fields
    maps = mapping_for(arch, fields, padded_vocab_size=padded_vocab_size(fields["vocab_size"], 8))
    with SafetensorsCheckpoint(tmp_path / "hf") as ckpt:
        check_hf_names(maps, ckpt.names(), fields)
        meg = dict(hf_to_megatron(maps, ckpt.read))
    with atomic_output_dir(tmp_path / "export") as out:
        (out / "config.json").write_text(json.dumps(from_megatron_fields(fields, arch, passthrough=hf_cfg)))
        with ShardedSafetensorsWriter(out, max_shard_bytes=20_000) as writer:
            for name, tensor in megatron_to_hf(maps, meg.__getitem__):
                writer.add(name, tensor)
    assert (tmp_path / "export" / "model.safetensors.index.json").exists()
    reloaded = getattr(transformers, arch).from_pretrained(tmp_path / "export").eval()
    ids = torch.randint(0, fields["vocab_size"], (1, 9))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
