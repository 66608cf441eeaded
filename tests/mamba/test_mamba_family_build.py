"""Building and training Mamba/hybrid models on CPU through the shared pipeline.

One training step must give every parameter a finite, non-zero gradient (a
parameter that never receives one is a wiring bug); a meta-device build must
come out initialised like an eager one (same recipe per parameter, buffers
identical); the model must be causal and its loss the cross entropy of its logits.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

VARIANTS = {
    "pure": dict(num_layers=2, hybrid_override_pattern="MM"),
    "hybrid": dict(),
    "rope_tied_layernorm": dict(position_embedding_type="rope", share_embeddings_and_output_weights=True,
                                normalization="LayerNorm", add_bias_linear=True),
    "learned_glu_zero_gamma": dict(position_embedding_type="learned_absolute", gated_linear_unit=True,
                                   activation_func=F.silu, layernorm_zero_centered_gamma=True,
                                   mamba_num_heads=4, mamba_num_groups=1),
    "ratios": dict(num_layers=6, hybrid_override_pattern=None, hybrid_attention_ratio=0.34, hybrid_mlp_ratio=0.17),
}


def _check_grads(model) -> None:
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert param.grad.isfinite().all(), f"{name} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_one_training_step_reaches_every_parameter(tiny_config, build, variant):
    built = build(tiny_config(**VARIANTS[variant]))
    model, builder = built.chunks[0], built.context.builder
    model.train()
    loss = builder.forward_step(model, builder.random_batch(2, 16))
    assert loss.shape == (2, 16)
    value = loss.mean()
    assert math.isfinite(value.item()) and 0 < value.item() < 20
    value.backward()
    _check_grads(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged


def test_loss_is_cross_entropy_of_logits_and_model_is_causal(tiny_config, build):
    built = build(tiny_config(position_embedding_type="rope"))
    model, builder = built.chunks[0], built.context.builder
    model.eval()
    batch = builder.random_batch(2, 12, seed=3)
    with torch.no_grad():
        logits = builder.forward_step(model, {**batch, "labels": None})
        loss = builder.forward_step(model, batch)
        assert logits.shape == (2, 12, 128)
        expected = F.cross_entropy(logits.reshape(-1, 128), batch["labels"].reshape(-1), reduction="none").view(2, 12)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
        changed = dict(batch, labels=None, tokens=batch["tokens"].clone())
        changed["tokens"][:, 8] = (changed["tokens"][:, 8] + 1) % 100
        other = builder.forward_step(model, changed)
    torch.testing.assert_close(other[:, :8], logits[:, :8])
    assert not torch.allclose(other[:, 8:], logits[:, 8:])


@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
def test_fused_norm_linear_is_norm_then_linear(tiny_config, build, normalization):
    config = tiny_config(normalization=normalization, layernorm_epsilon=1e-6)
    linear = build(config).chunks[0].decoder.layers[0].mixer.in_proj
    with torch.no_grad():
        linear.layer_norm_weight.uniform_(0.5, 1.5)
        if normalization == "LayerNorm":
            linear.layer_norm_bias.uniform_(-0.5, 0.5)
        x = torch.randn(5, 2, 64)
        out, _ = linear(x)
        ref_norm = torch.nn.RMSNorm(64, eps=1e-6) if normalization == "RMSNorm" else torch.nn.LayerNorm(64, eps=1e-6)
        ref_norm.weight.copy_(linear.layer_norm_weight)
        if normalization == "LayerNorm":
            ref_norm.bias.copy_(linear.layer_norm_bias)
        torch.testing.assert_close(out, ref_norm(x) @ linear.weight.T, rtol=1e-5, atol=1e-5)


def _tp_attrs(param) -> tuple:
    return tuple(getattr(param, a, None) for a in ("tensor_model_parallel", "partition_dim", "partition_stride"))


def _same_recipe(name: str, meta: torch.Tensor, eager: torch.Tensor) -> None:
    """Values drawn from the same distribution (or identical where the init is a constant)."""
    meta, eager = meta.float(), eager.float()
    if eager.min() == eager.max():
        assert torch.equal(meta, eager), f"{name}: constant init {eager.flatten()[0]} differs"
    elif name.endswith("A_log"):
        assert (meta >= 0).all() and (meta <= math.log(16) + 1e-6).all() and meta.unique().numel() > 1, name
    elif name.endswith("dt_bias"):
        dt = F.softplus(meta)
        assert (dt >= 1e-4 * 0.999).all() and (dt <= 0.1 * 1.001).all() and dt.unique().numel() > 1, name
    elif name.endswith("conv1d.bias"):
        assert meta.abs().max() <= 0.5 and meta.std() > 0.1, name  # U(+-1/sqrt(kernel))
    else:
        n = eager.numel()
        assert n >= 512, f"{name}: too small for a statistical comparison"
        ratio = (meta.std() / eager.std()).item()
        assert 0.8 < ratio < 1.25, f"{name}: std {meta.std():.4g} vs eager {eager.std():.4g}"
        assert abs(meta.mean() - eager.mean()) < 5 * eager.std() / math.sqrt(n), f"{name}: mean differs"


@pytest.mark.parametrize("variant", ["hybrid", "rope_tied_layernorm"])
def test_meta_build_initialises_like_eager(tiny_config, build, variant):
    overrides = dict(VARIANTS[variant], position_embedding_type="rope")
    eager = build(tiny_config(**overrides)).chunks[0]
    meta = build(tiny_config(**overrides), meta=True).chunks[0]
    eager_params, meta_params = dict(eager.named_parameters()), dict(meta.named_parameters())
    assert list(meta_params) == list(eager_params)
    for name, param in meta_params.items():
        ref = eager_params[name]
        assert not param.is_meta and param.shape == ref.shape and param.dtype == ref.dtype, name
        assert _tp_attrs(param) == _tp_attrs(ref), name
        _same_recipe(name, param.detach(), ref.detach())
    eager_buffers, meta_buffers = dict(eager.named_buffers()), dict(meta.named_buffers())
    assert list(meta_buffers) == list(eager_buffers)
    for name, buffer in meta_buffers.items():
        assert torch.equal(buffer, eager_buffers[name]), name
    assert torch.equal(meta.rotary_pos_emb.inv_freq, eager.rotary_pos_emb.inv_freq)  # an attribute, not a buffer


def test_meta_build_trains(tiny_config, build):
    built = build(tiny_config(), meta=True)
    model, builder = built.chunks[0], built.context.builder
    builder.forward_step(model, builder.random_batch(2, 8)).mean().backward()
    _check_grads(model)


def test_fsdp_units_are_whole_layers(tiny_config, build):
    built = build(tiny_config())
    units = built.context.builder.fsdp_unit_types()
    kinds = [type(m).__name__ for m in built.chunks[0].modules() if isinstance(m, units)]
    assert kinds == ["MambaLayer", "TransformerLayer", "MambaLayer", "TransformerLayer"]
