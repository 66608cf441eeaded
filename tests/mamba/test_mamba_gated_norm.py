"""GatedRMSNorm against transformers' MambaRMSNormGated and the written formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from plugtron_mamba.torch_impl.norm import GatedRMSNorm, gated_rms_norm

hf_mamba2 = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")


@pytest.mark.parametrize("hidden,group_size", [(128, 64), (128, 128), (96, 16)])
def test_matches_transformers_gated_norm(hidden: int, group_size: int) -> None:
    torch.manual_seed(hidden + group_size)
    ours = GatedRMSNorm(hidden, eps=1e-5, group_size=group_size)
    theirs = hf_mamba2.MambaRMSNormGated(hidden, group_size=group_size, eps=1e-5)
    weight = torch.randn(hidden)
    with torch.no_grad():
        ours.weight.copy_(weight)
        theirs.weight.copy_(weight)
    x, z = torch.randn(3, 7, hidden), torch.randn(3, 7, hidden)
    torch.testing.assert_close(ours(x, z), theirs(x, z), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-6)


def test_formula_norm_after_gate_and_before_gate() -> None:
    torch.manual_seed(0)
    x, z, w = torch.randn(5, 12, dtype=torch.float64), torch.randn(5, 12), torch.randn(12)
    gated = x * F.silu(z.double())
    groups = gated.reshape(5, 3, 4)
    expected = (groups / groups.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()).reshape(5, 12)
    out = gated_rms_norm(x, w, z=z.double(), eps=1e-5, group_size=4)
    torch.testing.assert_close(out, (expected.float() * w).double(), atol=1e-6, rtol=1e-6)

    plain = x.reshape(5, 3, 4)
    normed = (plain / plain.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()).reshape(5, 12)
    out_before = gated_rms_norm(x, w, z=z.double(), group_size=4, norm_before_gate=True)
    torch.testing.assert_close(
        out_before, normed * w.double() * F.silu(z.double()), atol=1e-6, rtol=1e-6
    )


def test_state_dict_surface_and_dtype() -> None:
    norm = GatedRMSNorm(32, group_size=8, dtype=torch.bfloat16)
    assert list(norm.state_dict()) == ["weight"]
    assert norm.bias is None
    assert torch.equal(norm.weight, torch.ones(32, dtype=torch.bfloat16))
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    assert norm(x, torch.randn_like(x)).dtype == torch.bfloat16
    with pytest.raises(ValueError):
        GatedRMSNorm(30, group_size=8)
