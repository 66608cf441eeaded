"""The mixer's hand-written backward against autograd through plain-op definitions.

:mod:`plugtron_mamba.torch_impl.inner` runs conv + scan + gated norm as one
autograd function whose backward is written by hand (for speed). Every gradient
it returns is compared here, in float64, with autograd through the obvious
op-by-op computation: ``F.conv1d``, the step-by-step recurrence, the norm
formula. The last test compares the whole mixer's gradients with transformers'
own Mamba-2 mixer.
"""

from __future__ import annotations

from typing import Any, Optional

import pytest
import torch
import torch.nn.functional as F

from plugtron_mamba.torch_impl.conv import causal_conv_backward, causal_conv_forward
from plugtron_mamba.torch_impl.inner import InnerShape, conv_scan_norm
from plugtron_mamba.torch_impl.norm import gated_rms_norm, gated_rms_norm_backward, gated_rms_norm_forward
from plugtron_mamba.torch_impl.ssd import ssd_sequential_reference

f64 = torch.float64


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=f64)


@pytest.mark.parametrize("length", [1, 2, 3, 9])
@pytest.mark.parametrize("bias", [True, False])
def test_causal_conv_matches_conv1d(length: int, bias: bool) -> None:
    gen = torch.Generator().manual_seed(length)
    x, w = _randn(gen, 2, length, 5).requires_grad_(), _randn(gen, 5, 1, 4).requires_grad_()
    b = _randn(gen, 5).requires_grad_() if bias else None
    expected = F.conv1d(x.transpose(1, 2), w, b, padding=3, groups=5)[..., :length].transpose(1, 2)
    grad = _randn(gen, *expected.shape)
    expected.backward(grad)
    torch.testing.assert_close(causal_conv_forward(x.detach(), w.detach(), None if b is None else b.detach()),
                               expected.detach(), atol=1e-12, rtol=0)
    gx, gw, gb = causal_conv_backward(grad, x.detach(), w.detach(), bias)
    torch.testing.assert_close(gx, x.grad, atol=1e-12, rtol=0)
    torch.testing.assert_close(gw, w.grad, atol=1e-12, rtol=0)
    assert (gb is None) == (b is None)
    if b is not None:
        torch.testing.assert_close(gb, b.grad, atol=1e-12, rtol=0)


def test_gated_rms_norm_backward_matches_autograd() -> None:
    gen = torch.Generator().manual_seed(2)
    x, z, w = (_randn(gen, *s).requires_grad_() for s in [(2, 5, 12), (2, 5, 12), (12,)])
    expected = gated_rms_norm(x, w, z=z, eps=1e-5, group_size=4)
    out, saved = gated_rms_norm_forward(x.detach(), z.detach(), w.detach(), 1e-5, 4)
    torch.testing.assert_close(out, expected.detach(), atol=1e-12, rtol=0)
    grad = _randn(gen, 2, 5, 12)
    expected.backward(grad)
    for mine, leaf in zip(gated_rms_norm_backward(grad, x.detach(), z.detach(), w.detach(), saved), (x, z, w)):
        torch.testing.assert_close(mine, leaf.grad, atol=1e-12, rtol=0)


def _op_by_op(zxbcdt: torch.Tensor, conv_w: torch.Tensor, conv_b: Optional[torch.Tensor], dt_bias: torch.Tensor,
              A_log: torch.Tensor, D: torch.Tensor, norm_w: Optional[torch.Tensor], shape: InnerShape) -> torch.Tensor:
    """What the mixer computed op by op before the fused function (autograd-differentiable)."""
    b, s, _ = zxbcdt.shape
    h, p, g, n = shape.nheads, shape.headdim, shape.ngroups, shape.d_state
    z, xbc, dt = zxbcdt.split(shape.splits, dim=-1)
    taps, channels = conv_w.shape[-1], conv_w.shape[0]
    xbc = F.silu(F.conv1d(xbc.transpose(1, 2), conv_w, conv_b, padding=taps - 1, groups=channels)[..., :s])
    x, B, C = xbc.transpose(1, 2).split([h * p, g * n, g * n], dim=-1)
    y = ssd_sequential_reference(x.reshape(b, s, h, p), F.softplus(dt + dt_bias), -torch.exp(A_log),
                                 B.reshape(b, s, g, n), C.reshape(b, s, g, n),
                                 D=D if D.numel() == h else D.view(h, p)).flatten(-2)
    if norm_w is None:
        return y * F.silu(z)
    return gated_rms_norm(y, norm_w, z=z, eps=shape.norm_eps, group_size=shape.norm_group)


@pytest.mark.parametrize("groups,norm,per_channel_D,conv_bias,length",
                         [(2, True, False, True, 13), (1, True, True, False, 8), (2, False, True, True, 5),
                          (4, True, False, True, 1)])
def test_conv_scan_norm_gradients_match_op_by_op(groups: int, norm: bool, per_channel_D: bool, conv_bias: bool,
                                                 length: int) -> None:
    shape = InnerShape(nheads=4, headdim=3, ngroups=groups, d_state=5, chunk=4, norm_eps=1e-5,
                       norm_group=12 // groups if norm else None)
    gen = torch.Generator().manual_seed(groups * 10 + length)
    channels = shape.splits[1]
    leaves = {
        "zxbcdt": _randn(gen, 2, length, sum(shape.splits)),
        "conv_w": _randn(gen, channels, 1, 4) * 0.5,
        "conv_b": _randn(gen, channels) if conv_bias else None,
        "dt_bias": _randn(gen, 4) * 0.5,
        "A_log": torch.rand(4, generator=gen, dtype=f64) * 2,
        "D": _randn(gen, 12 if per_channel_D else 4),
        "norm_w": 1 + 0.3 * _randn(gen, 12) if norm else None,
    }
    results = []
    for fn in (conv_scan_norm, _op_by_op):
        args = {k: None if v is None else v.clone().requires_grad_() for k, v in leaves.items()}
        out = fn(*args.values(), shape)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=f64).view(out.shape))
        results.append((out.detach(), {k: v.grad for k, v in args.items() if v is not None}))
    (mine, my_grads), (expected, grads) = results
    torch.testing.assert_close(mine, expected, atol=1e-10, rtol=0)
    assert my_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(my_grads[name], grads[name], atol=1e-9, rtol=1e-9, msg=name)


def test_mixer_gradients_match_transformers(make_mixer: Any) -> None:
    """Input and every parameter gradient of the whole mixer vs transformers' Mamba2Mixer (float32)."""
    mamba2 = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    import transformers

    mixer = make_mixer(seed=9)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        mixer.norm.weight.copy_(1 + 0.3 * torch.randn(mixer.norm.weight.shape, generator=gen))
        mixer.D.copy_(torch.randn(mixer.D.shape, generator=gen))
    config = transformers.Mamba2Config(hidden_size=64, state_size=16, head_dim=16, n_groups=2, expand=2,
                                       conv_kernel=4, chunk_size=8, num_heads=8, num_hidden_layers=1,
                                       layer_norm_epsilon=1e-5, use_bias=False, use_conv_bias=True)
    hf = mamba2.Mamba2Mixer(config, layer_idx=0)
    hf.load_state_dict({k: v for k, v in mixer.state_dict().items() if not k.endswith("_extra_state")})
    x = torch.randn(2, 19, 64, generator=gen)
    x_ours, x_hf = x.clone().requires_grad_(), x.clone().requires_grad_()
    mixer(x_ours.transpose(0, 1))[0].transpose(0, 1).square().mean().backward()
    hf(x_hf).square().mean().backward()
    torch.testing.assert_close(x_ours.grad, x_hf.grad, atol=1e-5, rtol=1e-4)
    hf_params = dict(hf.named_parameters())
    for name, param in mixer.named_parameters():
        torch.testing.assert_close(param.grad, hf_params[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_conv_scan_norm_in_bfloat16_follows_float32() -> None:
    """bf16 inputs and parameters: output and gradients come back in each tensor's own dtype,
    and stay close to the float32 computation (the function computes in float32 inside)."""
    shape = InnerShape(nheads=4, headdim=8, ngroups=2, d_state=8, chunk=4, norm_eps=1e-5, norm_group=16)
    gen = torch.Generator().manual_seed(5)
    channels = shape.splits[1]
    base = [torch.randn(2, 11, sum(shape.splits), generator=gen), torch.randn(channels, 1, 4, generator=gen) * 0.5,
            torch.randn(channels, generator=gen), torch.randn(4, generator=gen) * 0.5,
            torch.rand(4, generator=gen), torch.randn(4, generator=gen), 1 + 0.3 * torch.randn(32, generator=gen)]
    runs = []
    for dtype in (torch.float32, torch.bfloat16):
        # A_log and D stay float32, as the mixer keeps them
        leaves = [t.to(torch.float32 if i in (4, 5) else dtype).detach().clone().requires_grad_()
                  for i, t in enumerate(base)]
        out = conv_scan_norm(*leaves, shape)
        out.float().square().mean().backward()
        runs.append((out, leaves))
    (ref_out, ref_leaves), (out, leaves) = runs
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref_out.detach(), atol=0.05, rtol=0.05)
    for i, (leaf, ref) in enumerate(zip(leaves, ref_leaves)):
        assert leaf.grad.dtype == leaf.dtype, i
        scale = ref.grad.abs().max()
        assert (leaf.grad.float() - ref.grad).abs().max() <= 0.05 * scale, i


def test_conv_scan_norm_ignores_autocast() -> None:
    """Under CPU autocast to bf16 the function still computes in float32: same output and
    gradients as without autocast (autocast would otherwise run the scan's matmuls in bf16)."""
    shape = InnerShape(nheads=4, headdim=8, ngroups=1, d_state=16, chunk=8, norm_eps=1e-5, norm_group=32)
    gen = torch.Generator().manual_seed(6)
    channels = shape.splits[1]
    base = [torch.randn(1, 20, sum(shape.splits), generator=gen), torch.randn(channels, 1, 4, generator=gen) * 0.5,
            torch.randn(channels, generator=gen), torch.randn(4, generator=gen), torch.rand(4, generator=gen),
            torch.randn(4, generator=gen), 1 + 0.3 * torch.randn(32, generator=gen)]
    runs = []
    for enabled in (False, True):
        leaves = [t.clone().requires_grad_() for t in base]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            out = conv_scan_norm(*leaves, shape)
            out.square().mean().backward()
        runs.append((out.detach(), [leaf.grad for leaf in leaves]))
    assert runs[1][0].dtype == torch.float32
    torch.testing.assert_close(runs[1][0], runs[0][0], atol=0, rtol=0)
    for with_autocast, without in zip(runs[1][1], runs[0][1]):
        torch.testing.assert_close(with_autocast, without, atol=0, rtol=0)
