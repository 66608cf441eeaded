"""Rotary frequencies of every RoPE variant against references written from the formulas.

Each reference below is computed in float64 Python from the published
definitions, not from megatron's code, and compared with what the *built*
model's ``rotary_pos_emb`` module holds and produces:

* RoPE (Su et al.): theta_i = base ** (-2 i / d) for i < d / 2, d = the rotary
  channels per head; position p rotates pair i by p * theta_i; megatron lays
  the angles out "rotate-half" style, [angles, angles] along the channels.
* Linear interpolation (Chen et al.): positions are divided by the factor.
* Llama-3 scaling: wavelength w = 2 pi / theta; w < L / high keeps theta,
  w > L / low divides it by the factor, in between it is blended with
  s = (L / w - low) / (high - low). megatron fixes low = 1, high = 4,
  L = 8192 (rotary_pos_embedding.py, ``_apply_scaling`` defaults).
* YaRN (Peng et al.): index i completes L / (2 pi base ** (2 i / d)) turns
  over the original context L; solving for the index where that count equals
  beta gives i(beta) = d ln(L / (2 pi beta)) / (2 ln base). Indices below
  i(beta_fast) keep theta, above i(beta_slow) use theta / scale, a linear ramp
  blends between (bounds floored/ceiled when rounding is on). Attention logits
  are scaled through cos/sin by 0.1 m ln(scale) + 1 (ratio for mscale_all_dim).
* mrope (Qwen2-VL): the d / 2 frequencies are split into (temporal, height,
  width) sections, each driven by its own row of position_ids [3, b, s].
"""

from __future__ import annotations

import math

import pytest
import torch

KV = 16  # hidden 64 / 4 heads


def rope_inv_freq(dim: int, base: float) -> list[float]:
    return [base ** (-2.0 * i / dim) for i in range(dim // 2)]


def llama3_inv_freq(freqs: list[float], factor: float, low=1.0, high=4.0, original=8192.0) -> tuple[list[float], set[str]]:
    out, regimes = [], set()
    for theta in freqs:
        wavelength = 2 * math.pi / theta
        if wavelength < original / high:
            out.append(theta), regimes.add("kept")
        elif wavelength > original / low:
            out.append(theta / factor), regimes.add("divided")
        else:
            smooth = (original / wavelength - low) / (high - low)
            out.append((1 - smooth) * theta / factor + smooth * theta), regimes.add("blended")
    return out, regimes


def yarn_inv_freq(dim: int, base: float, scale: float, original: int, beta_fast: float, beta_slow: float, round_to_int: bool) -> list[float]:
    def index_for(turns: float) -> float:
        return dim * math.log(original / (2 * math.pi * turns)) / (2 * math.log(base))

    lo, hi = index_for(beta_fast), index_for(beta_slow)
    if round_to_int:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    hi = hi + 0.001 if hi == lo else hi
    out = []
    for i, theta in enumerate(rope_inv_freq(dim, base)):
        ramp = min(max((i - lo) / (hi - lo), 0.0), 1.0)  # 0: keep theta, 1: interpolate
        out.append((1 - ramp) * theta + ramp * theta / scale)
    return out


def yarn_attention_factor(scale: float, mscale: float, mscale_all_dim: float) -> float:
    def factor(m: float) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    return factor(mscale) / factor(mscale_all_dim)


def angles(inv_freq: list[float], positions: torch.Tensor) -> torch.Tensor:
    """[len(positions), 1, 1, 2 * len(inv_freq)] in megatron's rotate-half layout."""
    half = positions.double()[:, None] * torch.tensor(inv_freq, dtype=torch.float64)[None, :]
    return torch.cat([half, half], dim=-1)[:, None, None, :]


def close(actual: torch.Tensor, expected, rtol: float = 2e-6) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=1e-6)


@pytest.fixture
def rotary(tiny_config, build):
    """``rotary(**overrides)`` -> (built model, its rotary module) for a one-layer model."""

    def make(**overrides):
        model = build(tiny_config(num_layers=1, **overrides)).chunks[0]
        return model, model.rotary_pos_emb

    return make


@pytest.mark.parametrize("base,percent", [(10000, 1.0), (500000, 1.0), (10000, 0.5)])
def test_rope_frequencies(rotary, base: int, percent: float) -> None:
    _, rope = rotary(rotary_base=base, rotary_percent=percent)
    dim = int(KV * percent)
    close(rope.inv_freq, rope_inv_freq(dim, base))
    close(rope(24), angles(rope_inv_freq(dim, base), torch.arange(24)))


def test_linear_interpolation_divides_positions(rotary) -> None:
    _, rope = rotary(seq_len_interpolation_factor=4.0)
    close(rope.inv_freq, rope_inv_freq(KV, 10000))
    close(rope(24), angles(rope_inv_freq(KV, 10000), torch.arange(24) / 4.0))


@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_llama3_scaling(rotary, factor: float) -> None:
    _, rope = rotary(rotary_base=500000, rope_scaling=True, rope_scaling_factor=factor)
    expected, regimes = llama3_inv_freq(rope_inv_freq(KV, 500000), factor)
    assert regimes == {"kept", "blended", "divided"}, "the test must exercise all three Llama-3 regimes"
    close(rope.inv_freq, expected)
    close(rope(24), angles(expected, torch.arange(24)))


@pytest.mark.parametrize("round_to_int", [True, False])
@pytest.mark.parametrize("mscale,mscale_all_dim", [(1.0, 0.0), (1.0, 1.0), (0.707, 0.5)])
def test_yarn(rotary, round_to_int: bool, mscale: float, mscale_all_dim: float) -> None:
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import _yarn_get_concentration_factor_from_config

    model, rope = rotary(
        position_embedding_type="yarn", yarn_rotary_scaling_factor=4.0, yarn_original_max_position_embeddings=4096,
        yarn_mscale=mscale, yarn_mscale_all_dim=mscale_all_dim, yarn_correction_range_round_to_int=round_to_int,
    )
    expected = yarn_inv_freq(KV, 10000, 4.0, 4096, 32.0, 1.0, round_to_int)
    theta = rope_inv_freq(KV, 10000)
    assert expected[0] == theta[0] and math.isclose(expected[-1], theta[-1] / 4), "ramp must span keep..interpolate"
    assert any(theta[i] / 4 < expected[i] < theta[i] for i in range(len(theta))), "some frequencies must be blended"
    emb, factor = rope(24)
    close(emb, angles(expected, torch.arange(24)))
    assert math.isclose(factor, yarn_attention_factor(4.0, mscale, mscale_all_dim), rel_tol=1e-9)
    close(rope.cos_cached[:24], emb.cos() * factor, rtol=1e-5)
    # attention applies the factor because the builder puts the yarn fields on megatron's config
    assert math.isclose(_yarn_get_concentration_factor_from_config(model.config), factor, rel_tol=1e-9)


def test_plain_rope_has_no_yarn_attention_factor(rotary) -> None:
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import _yarn_get_concentration_factor_from_config

    model, _ = rotary()
    assert _yarn_get_concentration_factor_from_config(model.config) == 1.0


def mrope_reference(inv_freq: list[float], section: list[int], position_ids: torch.Tensor) -> torch.Tensor:
    """[s, b, 1, 2 * len(inv_freq)]: frequency k takes its positions from the row of its section."""
    owner = [row for row, size in enumerate(section) for _ in range(size)]
    _, batch, seq = position_ids.shape
    half = torch.empty(seq, batch, len(inv_freq), dtype=torch.float64)
    for k, theta in enumerate(inv_freq):
        half[:, :, k] = position_ids[owner[k]].double().T * theta
    return torch.cat([half, half], dim=-1)[:, :, None, :]


@pytest.mark.parametrize("section", [[2, 3, 3], [4, 2, 2], [8, 0, 0]])
def test_mrope_sections(rotary, section: list[int]) -> None:
    model, rope = rotary(position_embedding_type="mrope", mrope_section=section, rotary_base=1000000)
    gen = torch.Generator().manual_seed(0)
    position_ids = torch.stack([torch.arange(12).expand(2, -1), torch.randint(0, 7, (2, 12), generator=gen), torch.randint(0, 9, (2, 12), generator=gen)])
    inv_freq = rope_inv_freq(KV, 1000000)
    close(rope.inv_freq, inv_freq)
    close(rope(position_ids, model.mrope_section), mrope_reference(inv_freq, section, position_ids))


def test_learned_absolute_and_none_have_no_rotary(tiny_config, build) -> None:
    learned = build(tiny_config(num_layers=1, position_embedding_type="learned_absolute")).chunks[0]
    assert not hasattr(learned, "rotary_pos_emb")
    assert tuple(learned.embedding.position_embeddings.weight.shape) == (32, 64)
    nope = build(tiny_config(num_layers=1, position_embedding_type="none")).chunks[0]
    assert not hasattr(nope, "rotary_pos_emb")
    assert not hasattr(nope.embedding, "position_embeddings")


@pytest.mark.parametrize("kind,uses_position_ids", [("learned_absolute", True), ("mrope", True), ("rope", False), ("none", False)])
def test_which_variants_read_position_ids(tiny_config, build, kind: str, uses_position_ids: bool) -> None:
    """megatron's rope/yarn use positions 0..s-1 whatever position_ids say; learned and mrope read them."""
    extra = {"mrope_section": [2, 3, 3]} if kind == "mrope" else {}
    built = build(tiny_config(num_layers=1, position_embedding_type=kind, **extra))
    model, builder = built.chunks[0], built.context.builder
    batch = builder.random_batch(1, 8)
    batch.pop("labels")
    with torch.no_grad():
        logits = builder.forward_step(model, batch)
        batch["position_ids"] = batch["position_ids"].flip(-1).contiguous()
        shuffled = builder.forward_step(model, batch)
    assert torch.equal(logits, shuffled) is not uses_position_ids
