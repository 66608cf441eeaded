"""In-process (one rank) import, parity, export and megatron checkpoints of the HF bridge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from plugtron.sharding import unwrap
from plugtron_hf_bridge import exporter
from plugtron_hf_bridge.checkpoint import bridge_meta, load_megatron, save_megatron
from plugtron_hf_bridge.exporter import export_hf
from plugtron_hf_bridge.importer import import_hf
from plugtron_hf_bridge.verify import verify

from hfb_helpers import CASES, bit_exact, make_hf


def _config_diff(a: Path, b: Path) -> list[str]:
    left, right = (json.loads((d / "config.json").read_text()) for d in (a, b))
    return sorted(k for k in set(left) | set(right) if k != "transformers_version" and left.get(k) != right.get(k))


@pytest.mark.parametrize("name,arch,tied,vocab", CASES, ids=[c[0] for c in CASES])
def test_tp1_parity_and_bit_exact_round_trip(tmp_path, plugtron_single_rank, pm, name, arch, tied, vocab) -> None:
    src = make_hf(tmp_path / "hf", arch, tied=tied, vocab=vocab)
    imported = import_hf(src, pm=pm, parallel=plugtron_single_rank)
    config = imported.plan.config
    assert config.padded_vocab_size() > vocab and config.share_embeddings_and_output_weights == tied
    report = verify(src, imported=imported)
    assert report.max_abs_diff <= 1e-4 and report.top1_agreement == 1.0 and report.logit_scale > 0.2, report
    params = dict(unwrap(imported.built.chunks[0]).named_parameters())  # megatron's TP attributes survive
    qkv, proj = params["decoder.layers.0.self_attention.linear_qkv.weight"], params["decoder.layers.0.self_attention.linear_proj.weight"]
    assert (qkv.tensor_model_parallel, qkv.partition_dim, proj.partition_dim) == (True, 0, 1)
    export_hf(imported.built, config, imported.plan.adapter, tmp_path / "out", source_hf_config=imported.plan.hf_config)
    assert bit_exact(src, tmp_path / "out") == []
    assert _config_diff(src, tmp_path / "out") == []


def test_bf16_stays_bf16_unless_dtype_is_given(tmp_path, plugtron_single_rank, pm) -> None:
    src = make_hf(tmp_path / "hf", dtype="bfloat16")
    imported = import_hf(src, pm=pm, parallel=plugtron_single_rank)
    params = list(unwrap(imported.built.chunks[0]).parameters())
    assert imported.plan.dtype_name == "bfloat16" and {p.dtype for p in params} == {torch.bfloat16}
    assert type(imported.built.chunks[0]).__name__ == "Float16Module"
    export_hf(imported.built, imported.plan.config, imported.plan.adapter, tmp_path / "out",
              source_hf_config=imported.plan.hf_config)
    assert bit_exact(src, tmp_path / "out") == [] and _config_diff(src, tmp_path / "out") == []
    upcast = import_hf(src, dtype="float32", pm=pm, parallel=plugtron_single_rank)
    assert {p.dtype for p in unwrap(upcast.built.chunks[0]).parameters()} == {torch.float32}
    report = verify(src, imported=upcast)  # transformers upcasts the same bf16 values: exact parity
    assert report.max_abs_diff <= 1e-4, report


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_verify_is_judged_against_transformers_own_rounding(tmp_path, plugtron_single_rank, pm, dtype) -> None:
    src = make_hf(tmp_path / "hf", dtype=dtype, seed=1)
    imported = import_hf(src, pm=pm, parallel=plugtron_single_rank)
    report = verify(src, dtype=dtype, imported=imported)
    assert report.ok and report.dtype == dtype, report
    assert 1e-4 < report.reference_noise < 0.05 and report.tolerance == pytest.approx(2 * report.reference_noise)
    assert report.max_abs_diff <= 1.1 * report.reference_noise  # measured 0.65-1.03x across architectures
    # A typical layout slip in one layer (two query heads swapped in linear_qkv) fails the same check.
    qkv = unwrap(imported.built.chunks[0]).decoder.layers[1].self_attention.linear_qkv.weight
    head = imported.plan.config.kv_channels
    with torch.no_grad():
        qkv[: 2 * head] = torch.cat([qkv[head : 2 * head], qkv[:head]])
    broken = verify(src, dtype=dtype, imported=imported)
    assert not broken.ok and broken.max_abs_diff > broken.tolerance, broken


def test_megatron_checkpoint_round_trip_with_tokenizer(tmp_path, plugtron_single_rank, pm) -> None:
    src = make_hf(tmp_path / "hf", "Qwen2ForCausalLM", tokenizer=True)
    imported = import_hf(src, pm=pm, parallel=plugtron_single_rank)
    plan = imported.plan
    assert plan.tokenizer_files == ["tokenizer_config.json", "generation_config.json"]
    meg = save_megatron(tmp_path / "meg", imported.built, plan.config, meta=bridge_meta(plan.architecture, plan.hf_config, plan.config),
                        extra_files=[src / f for f in plan.tokenizer_files])
    assert {p.name for p in meg.iterdir()} == {"plugtron_model.json", "hf_bridge.json", "weights",
                                                 "tokenizer_config.json", "generation_config.json"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    loaded = load_megatron(meg, pm=pm, parallel=plugtron_single_rank)
    export_hf(loaded.built, loaded.config, plan.adapter, tmp_path / "back", source_hf_config=loaded.meta["hf_config"],
              extra_files=loaded.tokenizer_files)
    assert bit_exact(src, tmp_path / "back") == [] and (tmp_path / "back" / "tokenizer_config.json").is_file()


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name not in {"hf"})


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_interrupted_export_leaves_no_destination_and_no_temp_dir(tmp_path, plugtron_single_rank, pm, monkeypatch, error) -> None:
    src = make_hf(tmp_path / "hf", "GPT2LMHeadModel")
    imported = import_hf(src, pm=pm, parallel=plugtron_single_rank)
    real = exporter.export_tensors

    def failing(*args: Any, **kwargs: Any) -> Iterator[Any]:
        for index, item in enumerate(real(*args, **kwargs)):
            if index == 7:
                raise error("injected mid-stream")
            yield item

    monkeypatch.setattr(exporter, "export_tensors", failing)
    with pytest.raises(error, match="injected"):
        export_hf(imported.built, imported.plan.config, imported.plan.adapter, tmp_path / "out", max_shard_bytes=4096)
    assert _leftovers(tmp_path) == []


def test_failed_megatron_save_leaves_nothing(tmp_path, plugtron_single_rank, pm, monkeypatch) -> None:
    from megatron.core import dist_checkpointing

    src = make_hf(tmp_path / "hf")
    imported = import_hf(src, pm=pm, parallel=plugtron_single_rank)
    plan = imported.plan

    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full (injected)")

    monkeypatch.setattr(dist_checkpointing, "save", broken)
    with pytest.raises(OSError, match="injected"):
        save_megatron(tmp_path / "meg", imported.built, plan.config, meta=bridge_meta(plan.architecture, plan.hf_config, plan.config))
    assert _leftovers(tmp_path) == []


def test_conversion_entry_points_take_per_call_wrap_hooks(tmp_path, plugtron_single_rank, pm) -> None:
    """import_hf and load_megatron pass pre/post-wrap hooks to build_model: pre sees the meta chunks
    before loading, post the loaded model (e.g. to freeze or inspect it before export)."""
    import torch

    seen: list[tuple[str, str]] = []

    def pre(chunks, config, context):
        seen.append(("pre", chunks[0].embedding.word_embeddings.weight.device.type))

    def post(chunks, config, context):
        seen.append(("post", chunks[0].embedding.word_embeddings.weight.device.type))

    src = make_hf(tmp_path / "hf", "LlamaForCausalLM", layers=2)
    imported = import_hf(src, pm=pm, parallel=plugtron_single_rank, pre_wrap_hooks=[pre], post_wrap_hooks=[post])
    assert seen == [("pre", "meta"), ("post", "cpu")]
    plan = imported.plan
    meg = save_megatron(tmp_path / "meg", imported.built, plan.config, meta=bridge_meta(plan.architecture, plan.hf_config, plan.config))
    seen.clear()
    loaded = load_megatron(meg, pm=pm, parallel=plugtron_single_rank, pre_wrap_hooks=[pre], post_wrap_hooks=[post])
    assert seen == [("pre", "meta"), ("post", "cpu")]
    weight = loaded.built.chunks[0].embedding.word_embeddings.weight
    assert torch.equal(weight, imported.built.chunks[0].embedding.word_embeddings.weight)
