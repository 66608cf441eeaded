"""The chunked SSD scan must equal the plain recurrence it is derived from."""

from __future__ import annotations

from typing import Dict, Optional

import pytest
import torch

from plugtron_mamba.torch_impl.ssd import ssd_chunked, ssd_sequential_reference


def _inputs(
    length: int,
    *,
    batch: int = 2,
    heads: int = 4,
    headdim: int = 3,
    groups: int = 2,
    d_state: int = 5,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    D_shape: Optional[str] = "heads",
    with_init: bool = True,
) -> Dict[str, Optional[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype)

    if D_shape == "heads":
        D = randn(heads)
    elif D_shape == "channels":
        D = randn(heads, headdim)
    else:
        D = None
    return dict(
        x=randn(batch, length, heads, headdim),
        # softplus'ed step sizes spanning small and large values
        dt=torch.nn.functional.softplus(randn(batch, length, heads) * 2),
        A=-torch.rand(heads, generator=gen, dtype=dtype) * 4 - 0.05,
        B=randn(batch, length, groups, d_state),
        C=randn(batch, length, groups, d_state),
        D=D,
        initial_states=randn(batch, heads, headdim, d_state) if with_init else None,
    )


@pytest.mark.parametrize("length", [0, 1, 5, 17, 40])
@pytest.mark.parametrize("chunk_size", [1, 3, 8, 16])
def test_chunked_matches_sequential_float64(length: int, chunk_size: int) -> None:
    args = _inputs(length, seed=length * 100 + chunk_size)
    y, state = ssd_chunked(**args, chunk_size=chunk_size, return_final_states=True)
    y_ref, state_ref = ssd_sequential_reference(**args, return_final_states=True)
    assert y.shape == y_ref.shape == (2, length, 4, 3)
    assert state.shape == state_ref.shape == (2, 4, 3, 5)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(state, state_ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    "groups,D_shape,with_init",
    [(1, None, False), (4, "channels", True), (2, "channels", False), (1, "heads", True)],
)
def test_chunked_variants_float64(groups: int, D_shape: Optional[str], with_init: bool) -> None:
    """Group sharing (1 group, one per head), per-channel D, no D, no initial state."""
    args = _inputs(23, groups=groups, D_shape=D_shape, with_init=with_init, seed=groups)
    y, state = ssd_chunked(**args, chunk_size=8, return_final_states=True)
    y_ref, state_ref = ssd_sequential_reference(**args, return_final_states=True)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(state, state_ref, atol=1e-10, rtol=0)


def test_chunked_float32_close_to_float64_reference() -> None:
    args64 = _inputs(70, heads=8, headdim=16, groups=2, d_state=16, seed=7)
    args32 = {k: (v.float() if v is not None else None) for k, v in args64.items()}
    y, state = ssd_chunked(**args32, chunk_size=16, return_final_states=True)
    y_ref, state_ref = ssd_sequential_reference(**args64, return_final_states=True)
    assert y.dtype == torch.float32 and state.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state.double(), state_ref, atol=1e-4, rtol=1e-4)


def test_float32_keeps_its_precision_when_log_decays_are_large() -> None:
    """A burst of strong decay early in each chunk drives the cumulative log-decay to about
    -640, after which steps decay gently. Every later decay is exp of a small difference of two
    large numbers: stored in float32 they would carry |cs| * 2^-24 of error into each exponent
    (a relative error of 8e-6 here, measured, which this bound rejects). The scan keeps
    them in float64 and stays at float32's usual accuracy."""
    args64 = _inputs(128, heads=4, headdim=16, groups=1, d_state=16, seed=5, with_init=False, D_shape=None)
    args64["A"] = torch.full((4,), -8.0, dtype=torch.float64)
    burst = (torch.arange(128) % 64) < 16  # the first 16 steps of each chunk of 64
    args64["dt"] = torch.where(burst[None, :, None], 5.0, 0.05).expand(2, 128, 4).to(torch.float64).contiguous()
    args32 = {k: (v.float() if v is not None else None) for k, v in args64.items()}
    y = ssd_chunked(**args32, chunk_size=64)
    y_ref = ssd_sequential_reference(**args64)
    relative = ((y.double() - y_ref).abs().max() / y_ref.abs().max()).item()
    assert relative < 1e-6, relative


def test_low_precision_inputs_return_input_dtype() -> None:
    args = _inputs(19, dtype=torch.bfloat16, seed=3)
    y, state = ssd_chunked(**args, chunk_size=8, return_final_states=True)
    assert y.dtype == torch.bfloat16 and state.dtype == torch.float32
    ref = ssd_sequential_reference(**{k: v.double() for k, v in args.items()})
    torch.testing.assert_close(y.double(), ref, atol=0.1, rtol=0.05)


def test_long_strongly_decaying_sequence_stays_finite() -> None:
    """Large dt*|A| makes cumulative log-decays huge; masking before exp keeps the
    result finite (a naive exp(cumsum_i - cumsum_j) overflows above the diagonal)."""
    args = _inputs(64, seed=11)
    args["dt"] = args["dt"] * 50 + 10
    y = ssd_chunked(**args, chunk_size=64)
    y_ref = ssd_sequential_reference(**args)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    "length,chunk,groups,D_shape,with_init",
    [(11, 4, 2, "heads", True), (1, 4, 1, None, False), (16, 8, 4, "channels", True), (9, 3, 1, "channels", False)],
)
def test_gradients_match_reference(length: int, chunk: int, groups: int, D_shape: Optional[str], with_init: bool) -> None:
    """The scan's hand-written backward against autograd through the recurrence (float64)."""
    base = _inputs(length, seed=5, groups=groups, D_shape=D_shape, with_init=with_init)
    names = [k for k in ("x", "dt", "A", "B", "C", "D", "initial_states") if base[k] is not None]
    grads = []
    for fn in (ssd_chunked, ssd_sequential_reference):
        leaves = {k: base[k].clone().requires_grad_(True) for k in names}
        y, state = fn(**{**base, **leaves}, chunk_size=chunk, return_final_states=True)
        (y.square().sum() + state.sum()).backward()
        grads.append({k: leaves[k].grad for k in names})
    for k in names:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-9, rtol=0, msg=k)


def test_shape_errors_are_reported() -> None:
    args = _inputs(5)
    with pytest.raises(ValueError, match="dt"):
        ssd_chunked(**{**args, "dt": args["dt"][:, :4]}, chunk_size=4)
    with pytest.raises(ValueError, match="divisible"):
        ssd_chunked(**_inputs(5, heads=3, groups=2, D_shape=None, with_init=False), chunk_size=4)
    with pytest.raises(ValueError, match="chunk_size"):
        ssd_chunked(**args, chunk_size=0)



def test_sources_do_not_import_gpu_kernel_packages() -> None:
    """The torch implementation must not depend on triton, mamba_ssm, causal_conv1d
    (or einops); checked on the import statements of every source file."""
    import ast
    import pathlib

    import plugtron_mamba.torch_impl as torch_impl

    forbidden = {"triton", "mamba_ssm", "causal_conv1d", "einops"}
    sources = sorted(pathlib.Path(torch_impl.__file__).parent.glob("*.py"))
    assert len(sources) >= 5
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path.name} imports {name}"


def test_chunk_recurrence_matches_its_definition_and_autograd() -> None:
    from plugtron_mamba.torch_impl.recurrence import recurrence_backward, recurrence_forward

    gen = torch.Generator().manual_seed(7)
    decay = torch.rand(2, 5, 3, 1, generator=gen, dtype=torch.float64)
    states = torch.randn(2, 5, 3, 4, generator=gen, dtype=torch.float64)
    initial = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    entering, final = recurrence_forward(decay, states, initial)
    leaves = [t.clone().requires_grad_(True) for t in (decay, states, initial)]
    state, expected = leaves[2], []
    for z in range(5):
        expected.append(state)
        state = leaves[0][:, z] * state + leaves[1][:, z]
    torch.testing.assert_close(entering, torch.stack(expected, 1).detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(final, state.detach(), atol=1e-12, rtol=0)
    grad_entering, grad_final = torch.randn_like(entering), torch.randn_like(final)
    (torch.stack(expected, 1) * grad_entering).sum().add((state * grad_final).sum()).backward()
    mine = recurrence_backward(decay, entering, grad_entering, grad_final)
    for got, leaf in zip(mine, leaves):
        torch.testing.assert_close(got, leaf.grad, atol=1e-12, rtol=0)
