"""Multi-token prediction (MTP) layers of DeepSeek-V3-shaped checkpoints, through the tensor table.

Published DeepSeek-V3 / GLM-4.5 checkpoints store MTP layer ``m`` as decoder layer
``model.layers.{num_hidden_layers + m}`` (``enorm``, ``hnorm``, ``eh_proj``, a full
MLA + MoE layer, ``shared_head.norm``, plus ``embed_tokens`` / ``shared_head.head``
copies of the model's embedding and head, which megatron shares instead of storing);
transformers 5.23 ignores them. These tests check that the architecture's table
(``mtp.layers.{m}`` <- ``model.layers.{n}``) covers every MTP parameter megatron
builds for MLA + MoE, that a checkpoint carrying MTP layers fills them and comes back
bit-exactly, and that the MTP block runs on the loaded weights. They drive the table
directly, then through the HF engine: the adapter's ``stored_mtp_layers`` sizes
``mtp_num_layers`` from the checkpoint's tensors (``plan_import`` must call it: the
last two tests need that one-line engine change), ``hf_copies`` names the
embedding / head copies the exporter writes back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from arch_cases import save_case
from arch_cases.deepseek import DEEPSEEK_V3
from hfb_helpers import read_all
from plugtron_gpt.hf import catalogue

ARCH = "DeepseekV3ForCausalLM"
LAYERS = DEEPSEEK_V3.config["num_hidden_layers"]
#: The MTP tensors a published checkpoint stores that megatron shares with the main model.
SHARED_COPIES = {"embed_tokens.weight": "model.embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}


def _fields(mtp: int) -> dict[str, Any]:
    cfg = {**DEEPSEEK_V3.config, "architectures": [ARCH]}
    return {**catalogue.to_megatron_fields(cfg), "mtp_num_layers": mtp}


def _checkpoint(tmp: Path, mtp: int) -> dict[str, Any]:
    """A tiny DeepSeek-V3 checkpoint with ``mtp`` MTP layers stored as published files store them."""
    import torch

    src = save_case(tmp / "hf", DEEPSEEK_V3)
    tensors = dict(read_all(src))
    fields = _fields(mtp)
    generator = torch.Generator().manual_seed(1)
    for mapping in catalogue.mapping_for(ARCH, fields):
        if mapping.megatron_name.startswith("mtp."):
            for name, shape in zip(mapping.hf_names, mapping.hf_shapes):
                tensors[name] = torch.randn(shape, generator=generator) * 0.2
    for m in range(mtp):
        for short, main in SHARED_COPIES.items():
            tensors[f"model.layers.{LAYERS + m}.{short}"] = tensors[main].clone()
    return tensors


def _build(fields: dict[str, Any], parallel: Any) -> Any:
    from plugtron import BuildOptions
    from plugtron.pipeline import build_model
    from plugtron_gpt.hf.fields import gpt_config_from_fields

    config = gpt_config_from_fields(fields)
    return config, build_model(config, parallel=parallel, options=BuildOptions())


def _targets(model: Any) -> dict[str, Any]:
    saved = set(model.state_dict(keep_vars=True))
    return {**dict(model.named_parameters()), **{n: b for n, b in model.named_buffers() if n in saved}}


@pytest.mark.parametrize("mtp", [1, 2])
def test_mtp_layers_import_and_export_bit_exactly(tmp_path, plugtron_single_rank, mtp) -> None:
    import torch

    from plugtron.conversion.table import hf_to_megatron, megatron_to_hf

    tensors = _checkpoint(tmp_path, mtp)
    fields = _fields(mtp)
    config, built = _build(fields, plugtron_single_rank)
    model = built.chunks[0]
    mappings = catalogue.adapter(ARCH).mappings(fields, padded_vocab_size=config.padded_vocab_size())
    targets = _targets(model)
    assert {m.megatron_name for m in mappings} == set(targets), "every MTP parameter is in the table, nothing more"
    assert sum(n.startswith("mtp.") for n in targets) >= 33 * mtp
    with torch.no_grad():
        for name, value in hf_to_megatron(mappings, tensors.__getitem__):
            targets[name].copy_(value)
    back = dict(megatron_to_hf(mappings, lambda name: targets[name].detach()))
    stored = {n for n in tensors if not any(n.endswith(f"{LAYERS + m}.{s}") for m in range(mtp) for s in SHARED_COPIES)}
    assert set(back) == stored
    assert [n for n in stored if not torch.equal(back[n], tensors[n])] == []

    # The engine's exporter writes the MTP layers back, the shared embedding / head copies included.
    from hfb_helpers import bit_exact
    from plugtron_hf_bridge.exporter import export_hf
    from safetensors.torch import save_file

    (tmp_path / "want").mkdir()
    save_file(tensors, str(tmp_path / "want" / "model.safetensors"), metadata={"format": "pt"})
    export_hf(built, config, catalogue.adapter(ARCH), tmp_path / "out")
    assert bit_exact(tmp_path / "want", tmp_path / "out") == []
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["num_nextn_predict_layers"] == mtp and written["num_hidden_layers"] == LAYERS

    # The MTP block runs on the loaded weights and gives a finite loss per MTP layer.
    from plugtron_gpt.mtp import prepare_forward

    tokens = torch.randint(0, DEEPSEEK_V3.config["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(0))
    prepare_forward(mtp)
    out = model(tokens, torch.arange(12).unsqueeze(0), None, labels=tokens)
    assert torch.isfinite(out).all()


def test_mtp_layers_copy_the_last_layers_kind() -> None:
    """megatron's MTP layer copies the last decoder layer's spec: MoE for DeepSeek-V3, with the expert bias."""
    names = {m.megatron_name for m in catalogue.mapping_for(ARCH, _fields(1))}
    assert "mtp.layers.0.transformer_layer.mlp.router.expert_bias" in names
    assert "mtp.layers.0.transformer_layer.mlp.linear_fc1.weight" not in names
    assert "mtp.layers.1.enorm.weight" not in names


def test_the_engine_imports_mtp_layers_sized_from_the_checkpoint_and_exports_them(tmp_path, plugtron_single_rank) -> None:
    """Through the HF engine's loader and exporter, with ``mtp_num_layers`` sized by the adapter from the
    checkpoint's tensors (``stored_mtp_layers``): the one step ``plan_import`` does not take yet."""
    import torch
    from safetensors.torch import save_file

    from hfb_helpers import bit_exact
    from plugtron_hf_bridge.exporter import export_hf
    from plugtron_hf_bridge.importer import ImportPlan, import_hf, set_layout
    from plugtron_hf_bridge.verify import verify

    tensors = _checkpoint(tmp_path, 1)
    src = tmp_path / "hf"
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    adapter = catalogue.adapter(ARCH)
    hf_config = json.loads((src / "config.json").read_text())
    config = adapter.config_from_hf(hf_config)
    assert config.mtp_num_layers is None
    config.mtp_num_layers = adapter.stored_mtp_layers(tensors, config)
    assert config.mtp_num_layers == 1
    set_layout(config, 1, 1, None, "float32")
    config.finalize()
    assert all(adapter.tolerated_unused(copy, config) for copy, _ in adapter.hf_copies(config))
    plan = ImportPlan(src, hf_config, ARCH, adapter, config, "float32", [], [])
    imported = import_hf(src, plan=plan, parallel=plugtron_single_rank)
    mtp = imported.built.chunks[0].mtp.layers[0]
    assert torch.equal(mtp.eh_proj.weight, tensors["model.layers.4.eh_proj.weight"])
    report = verify(src, imported=imported)  # the main head against transformers (which ignores MTP layers)
    assert report.max_abs_diff <= 1e-4 and report.top1_agreement == 1.0, report
    export_hf(imported.built, config, adapter, tmp_path / "out", source_hf_config=hf_config)
    assert bit_exact(src, tmp_path / "out") == []


@pytest.mark.multiprocess
def test_mtp_checkpoint_at_pp2_tp2_ep2(tmp_path) -> None:
    """MTP lives on the last pipeline stage; its experts split over EP like the decoder's. Through ``import_hf``
    (``mtp_num_layers`` sized from the checkpoint) at each layout: parity of the main head, bit-exact export."""
    import os
    import subprocess
    import sys

    from safetensors.torch import save_file

    tensors = _checkpoint(tmp_path, 1)
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    src = str(tmp_path / "hf")
    scenarios = [{"name": "pp2", "kind": "convert", "src": src, "seq": None, "pp": 2},
                 {"name": "tp2", "kind": "convert", "src": src, "seq": None, "tp": 2},
                 {"name": "ep2", "kind": "moe", "src": src, "ep": 2}]
    from hfb_helpers import run_scenarios

    for r in run_scenarios(scenarios, tmp_path / "out")[0]:
        assert r["diff"] <= 1e-4 and r["top1"] == 1.0 and r["mismatched"] == [], r


def test_the_launchers_torch_free_check_accepts_stored_mtp_layers_as_the_plan_does(tmp_path) -> None:
    """``convert --tp 2`` checks the checkpoint in the launcher without torch: it sizes the MTP layers from the
    tensor names as ``plan_import`` does, so a published DeepSeek-V3-style checkpoint is not refused there."""
    from safetensors.torch import save_file

    from plugtron_hf_bridge.importer import plan_import
    from plugtron_hf_bridge.preflight import preflight_import

    tensors = _checkpoint(tmp_path, 1)
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    assert preflight_import(tmp_path / "hf") is True
    assert plan_import(tmp_path / "hf").config.mtp_num_layers == 1
