"""The GPT architectures' tensor tables: bit-exact round trips, strict name use, shapes named on mismatch.

The repacking functions and table kinds themselves (core vocabulary) are tested in
``tests/core/test_core_conversion_table.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from plugtron.config.base import padded_vocab_size
from plugtron.conversion.table import hf_to_megatron, megatron_to_hf
from plugtron_gpt.hf.adapter import tolerated_unused
from plugtron_gpt.hf.catalogue import from_megatron_fields, mapping_for, to_megatron_fields
from plugtron_hf_bridge.errors import MappingError, TensorSetError, UnsupportedConfigError
from plugtron_hf_bridge.preflight import check_table
from plugtron_hf_bridge.safetensors_header import SafetensorsIndex
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


def index_of(tensors: dict[str, torch.Tensor], directory: Path) -> SafetensorsIndex:
    """The tensors saved as a one-file checkpoint (tied ones as copies), read back as the engine's header index."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    return SafetensorsIndex(directory)


def check_names(maps, tensors: dict[str, torch.Tensor], fields: dict, directory: Path, arch: str = "LlamaForCausalLM",
                dtype: str = "float32") -> list[str]:
    """The engine's one table check (``preflight.check_table``) with the GPT adapters' tolerated-unused rule."""
    tied = bool(fields["share_embeddings_and_output_weights"])
    return check_table(index_of(tensors, directory), maps, lambda name: tolerated_unused(name, tied), dtype, arch)


@pytest.mark.parametrize("key", list(MODELS))
@pytest.mark.parametrize("te", [False, True])
def test_round_trip_bit_exact_and_every_name_used_once(key: str, te: bool, tmp_path: Path) -> None:
    arch, model, fields = tiny_model(key, torch.bfloat16 if te else torch.float32)
    sd = hf_state(model)
    padded = padded_vocab_size(fields["vocab_size"], 64)
    maps = mapping_for(arch, fields, te_fused_norms=te, padded_vocab_size=padded)
    used = [n for m in maps for n in m.hf_names]
    assert len(used) == len(set(used)) and used == [n for m in mapping_for(arch, fields, te) for n in m.hf_names]
    skipped = check_names(maps, sd, fields, tmp_path, arch, "bfloat16" if te else "float32")
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


def test_the_table_check_is_strict(tmp_path: Path) -> None:
    """Recomputed buffers are tolerated (and returned); an unknown or a missing tensor is refused by name."""
    arch, model, fields = tiny_model("llama")
    maps = mapping_for(arch, fields)
    sd = hf_state(model)
    inv_freq = "model.layers.0.self_attn.rotary_emb.inv_freq"
    assert check_names(maps, {**sd, inv_freq: torch.ones(8)}, fields, tmp_path / "buffer") == [inv_freq]
    with pytest.raises(MappingError, match="model.layers.0.mlp.extra_scale") as info:
        check_names(maps, {**sd, "model.layers.0.mlp.extra_scale": torch.ones(3)}, fields, tmp_path / "extra")
    assert isinstance(info.value, TensorSetError) and info.value.names == ["model.layers.0.mlp.extra_scale"]
    with pytest.raises(MappingError, match="model.norm.weight") as info:
        check_names(maps, {k: v for k, v in sd.items() if k != "model.norm.weight"}, fields, tmp_path / "missing")
    assert info.value.names == ["model.norm.weight"]
    with pytest.raises(UnsupportedConfigError, match="BertForMaskedLM"):
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
    tied = bool(fields["share_embeddings_and_output_weights"])
    check_table(SafetensorsIndex(tmp_path / "hf"), maps, lambda name: tolerated_unused(name, tied), "float32", arch)
    with SafetensorsCheckpoint(tmp_path / "hf") as ckpt:
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
