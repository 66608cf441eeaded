"""Logit parity with transformers and bit-exact weight round trips, through the Mamba HF tables.

Each case saves a tiny random float32 transformers model (Mamba2ForCausalLM or
the hybrid NemotronHForCausalLM with Mamba, attention and MLP layers), reads
its safetensors file, maps every tensor through the adapter's table into a
plugtron Mamba model built by ``plugtron.pipeline.build_model`` (TP=1, torch
spec) and compares logits: max abs diff <= 1e-4. transformers runs its
pure-PyTorch Mamba-2 path on CPU; both sides use the checkpoint's chunk size,
and the sequence lengths are not multiples of it (padding paths run too).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from plugtron_mamba.hf.adapters import MAMBA2, NEMOTRON_H, MambaHFAdapter
from plugtron_mamba.hf.tiny import save_tiny_hf

TOL = 1e-4
CASES = {
    "mamba2": (MAMBA2, {}),
    "mamba2-tied-chunk16": (MAMBA2, {"tied": True, "chunk_size": 16, "vocab": 97}),
    "nemotron-h": (NEMOTRON_H, {}),
    "nemotron-h-mlp-only-hybrid": (NEMOTRON_H, {"pattern": "M-M", "chunk_size": 4}),
}


def _read(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def _convert(adapter: MambaHFAdapter, src: Path, build: Any) -> tuple[Any, Any, dict[str, torch.Tensor]]:
    """(built plugtron model, its config, the HF tensors) with every HF tensor mapped in."""
    config = adapter.config_from_hf(json.loads((src / "config.json").read_text()), source=str(src))
    built = build(config)
    hf = _read(src)
    mappings = adapter.tensor_mappings(config)
    used = {n for m in mappings for n in m.hf_names}
    assert not [n for n in hf if n not in used and not adapter.tolerated_unused(n, config)]
    state = {m.megatron_name: m.to_megatron([hf[n] for n in m.hf_names]) for m in mappings}
    model = built.chunks[0]
    params = dict(model.named_parameters())
    assert sorted(params) == sorted(state), "the table and the model disagree on the parameter set"
    with torch.no_grad():
        for name, tensor in state.items():
            assert params[name].dtype == tensor.dtype, name
            params[name].copy_(tensor)
    return built, config, hf


def _logits(built: Any, tokens: torch.Tensor) -> torch.Tensor:
    model, builder = built.chunks[0], built.context.builder
    model.eval()
    positions = torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)
    with torch.no_grad():
        return builder.forward_step(model, {"tokens": tokens, "position_ids": positions})


def _hf_logits(adapter: MambaHFAdapter, src: Path, tokens: torch.Tensor) -> tuple[torch.Tensor, Any]:
    import transformers

    model = getattr(transformers, adapter.architecture).from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens, use_cache=False).logits, model  # NemotronH without attention fails with a cache


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, build, case) -> None:
    adapter, kwargs = CASES[case]
    src = save_tiny_hf(tmp_path / "hf", adapter.architecture, **kwargs)
    built, config, _ = _convert(adapter, src, build)
    tokens = torch.randint(0, config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(1))
    reference, _ = _hf_logits(adapter, src, tokens)
    ours = _logits(built, tokens)
    assert ours.shape == (2, 21, config.padded_vocab_size()) and config.padded_vocab_size() > config.vocab_size
    diff = (ours[..., : config.vocab_size] - reference).abs().max().item()
    assert diff <= TOL and reference.abs().max() > 1.0, (diff, reference.abs().max().item())
    assert torch.equal(ours[..., : config.vocab_size].argmax(-1), reference.argmax(-1))


def test_nemotron_h_step_floor_is_inactive_in_the_parity_model(tmp_path) -> None:
    """transformers' NemotronH clamps softplus(dt + dt_bias) at time_step_min; megatron does not.
    The parity above holds because no step of the tiny model comes near that floor."""
    src = save_tiny_hf(tmp_path / "hf", NEMOTRON_H.architecture)
    tokens = torch.randint(0, 100, (2, 21), generator=torch.Generator().manual_seed(1))
    steps: list[torch.Tensor] = []
    import transformers

    model = transformers.NemotronHForCausalLM.from_pretrained(src).eval()
    hooks = []
    for layer in model.model.layers:
        if layer.block_type == "linear_attention":
            mixer = layer.mixer
            hooks.append(mixer.in_proj.register_forward_hook(
                lambda mod, inp, out, m=mixer: steps.append(
                    torch.nn.functional.softplus(out[..., -m.num_heads:] + m.dt_bias))))
    with torch.no_grad():
        model(tokens)
    for hook in hooks:
        hook.remove()
    assert steps and min(s.min().item() for s in steps) > 10 * model.config.time_step_min


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_to_megatron_to_hf_is_bit_exact(tmp_path, case, dtype) -> None:
    adapter, kwargs = CASES[case]
    src = save_tiny_hf(tmp_path / "hf", adapter.architecture, dtype=dtype, **kwargs)
    config = adapter.config_from_hf(json.loads((src / "config.json").read_text()))
    config.finalize()
    hf = _read(src)
    back: dict[str, torch.Tensor] = {}
    for mapping in adapter.tensor_mappings(config):
        megatron = mapping.to_megatron([hf[n] for n in mapping.hf_names])
        assert tuple(megatron.shape) == mapping.megatron_shape
        back.update(zip(mapping.hf_names, mapping.to_hf(megatron.clone())))
    expected = {n: t for n, t in hf.items() if not adapter.tolerated_unused(n, config)}
    assert sorted(back) == sorted(expected)
    for name, tensor in expected.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


def test_round_trip_through_the_plugtron_model_is_bit_exact(tmp_path, build) -> None:
    """HF -> parameters of a built plugtron model -> HF: the model stores what was loaded, unchanged."""
    src = save_tiny_hf(tmp_path / "hf", NEMOTRON_H.architecture)
    built, config, hf = _convert(NEMOTRON_H, src, build)
    params = dict(built.chunks[0].named_parameters())
    for mapping in NEMOTRON_H.tensor_mappings(config):
        for name, tensor in zip(mapping.hf_names, mapping.to_hf(params[mapping.megatron_name].detach())):
            assert torch.equal(tensor, hf[name]), name


def test_wrong_shapes_name_the_tensor(tmp_path) -> None:
    from plugtron_hf_bridge.errors import MappingError

    src = save_tiny_hf(tmp_path / "hf", MAMBA2.architecture)
    config = MAMBA2.config_from_hf(json.loads((src / "config.json").read_text()))
    table = {m.megatron_name: m for m in MAMBA2.tensor_mappings(config)}
    mapping = table["decoder.layers.1.mixer.in_proj.weight"]
    with pytest.raises(MappingError, match=r"backbone\.layers\.1\.mixer\.in_proj\.weight"):
        mapping.to_megatron([torch.zeros(10, 64)])
    assert table["decoder.layers.0.mixer.in_proj.layer_norm_weight"].hf_names == ("backbone.layers.0.norm.weight",)
