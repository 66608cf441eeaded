"""The variant modules against independent references, and variant models through the pipeline.

References: transformers' own classes and functions where they stand alone
(Gemma-2 RMSNorm and eager soft-capped attention, Nemotron LayerNorm1P,
Olmo2 RMSNorm, the sliding-window mask function) and megatron's
``get_sliding_window_causal_mask``. Dtype semantics are checked in bf16 too,
where the conventions differ.
"""

from __future__ import annotations

import types

import pytest
import torch

from plugtron.runtime.cpu import TorchNorm, ZeroCenteredLayerNorm, ZeroCenteredRMSNorm


def _norm_config(normalization: str, dtype: torch.dtype) -> types.SimpleNamespace:
    return types.SimpleNamespace(normalization=normalization, layernorm_zero_centered_gamma=True, params_dtype=dtype, sequence_parallel=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_centred_norms_are_gemmas_and_nemotrons(dtype: torch.dtype) -> None:
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.nemotron.modeling_nemotron import NemotronLayerNorm1P

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 32, generator=gen) * 3).to(dtype)
    rms = TorchNorm(_norm_config("RMSNorm", dtype), 32, eps=1e-6)
    assert type(rms) is ZeroCenteredRMSNorm and torch.count_nonzero(rms.weight) == 0  # (1 + 0) scaling at init
    theirs = Gemma2RMSNorm(32, eps=1e-6).to(dtype)
    ln = TorchNorm(_norm_config("LayerNorm", dtype), 32, eps=1e-5, sum_grads_over_tp=True)
    assert type(ln) is ZeroCenteredLayerNorm and all(p.sequence_parallel for p in ln.parameters())
    ln1p = NemotronLayerNorm1P(32, eps=1e-5).to(dtype)
    with torch.no_grad():
        for norm in (rms, theirs, ln, ln1p):
            for p in norm.parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
        assert torch.equal(rms(x), theirs(x))
        assert torch.equal(ln(x), ln1p(x))


def test_full_width_qk_norm_is_olmo2s(plugtron_single_rank) -> None:
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    from plugtron_gpt.qk_norm import FullWidthRMSNorm

    config = types.SimpleNamespace(tensor_model_parallel_size=1, layernorm_zero_centered_gamma=False, params_dtype=torch.float32)
    ours = FullWidthRMSNorm(config, hidden_size=8, eps=1e-6, heads=4)
    assert ours.weight.shape == (32,) and ours.weight.tensor_model_parallel and ours.weight.partition_dim == 0
    theirs = Olmo2RMSNorm(32, eps=1e-6)
    with torch.no_grad():
        ours.weight.normal_()
        theirs.weight.copy_(ours.weight)
    x = torch.randn(6, 2, 4, 8)  # [s, b, heads, head_dim] as megatron hands q to q_layernorm
    torch.testing.assert_close(ours(x), theirs(x.reshape(6, 2, 32)).view(6, 2, 4, 8), rtol=0, atol=1e-6)


def _attention(window=None, softcap=None, skip=None, layer_number: int = 1):
    from megatron.core.transformer.enums import AttnMaskType

    from plugtron_gpt.attention import SDPACoreAttention

    config = types.SimpleNamespace(attention_dropout=0.0, kv_channels=8, apply_query_key_layer_scaling=False,
                                   window_size=window, window_attn_skip_freq=skip)
    return SDPACoreAttention(config, layer_number, AttnMaskType.causal, softmax_scale=0.4, softcap=softcap).eval()


def test_window_mask_is_megatrons_and_transformers(plugtron_single_rank) -> None:
    from megatron.core.transformer.utils import get_sliding_window_causal_mask
    from transformers.masking_utils import sliding_window_causal_mask_function

    hf = sliding_window_causal_mask_function(4)  # HF sliding_window = 4 ...
    expected = torch.tensor([[bool(hf(0, 0, torch.tensor(i), torch.tensor(j))) for j in range(9)] for i in range(9)])
    allowed = _attention(window=(3, 0))._allowed(9, 9, None, True, torch.device("cpu"))  # ... is window_size (3, 0)
    assert torch.equal(allowed, expected)
    assert torch.equal(allowed, ~get_sliding_window_causal_mask(9, 9, (3, 0)))
    padding = torch.zeros(1, 1, 9, 9, dtype=torch.bool)
    padding[..., 2] = True  # an explicit mask (True = masked) is kept and windowed
    assert torch.equal(_attention(window=(3, 0))._allowed(9, 9, padding, False, torch.device("cpu"))[0, 0], ~padding[0, 0] & expected)


@pytest.mark.parametrize("skip,windowed", [(None, [1, 2, 3, 4]), (2, [1, 3]), ([0, 1, 1, 0], [2, 3])])
def test_windowed_layers_follow_megatrons_reading(skip, windowed: list[int]) -> None:
    assert [n for n in range(1, 5) if _attention(window=(3, 0), skip=skip, layer_number=n).window] == windowed


def test_soft_capped_attention_is_gemma2s(plugtron_single_rank) -> None:
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(7, 2, n, 8, generator=gen) * 4 for n in (4, 2, 2))  # [s, b, heads, d]; big scores saturate tanh
    ours = _attention(window=(2, 0), softcap=3.0)(q, k, v, None)
    module = types.SimpleNamespace(num_key_value_groups=2, training=False, head_dim=8)
    allowed = _attention(window=(2, 0))._allowed(7, 7, None, True, torch.device("cpu"))
    additive = torch.zeros(7, 7).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
    theirs, _ = eager_attention_forward(module, *(t.permute(1, 2, 0, 3) for t in (q, k, v)), additive, scaling=0.4, softcap=3.0)
    torch.testing.assert_close(ours, theirs.transpose(0, 1).reshape(7, 2, 32), rtol=1e-5, atol=1e-6)
    assert (ours - _attention(window=(2, 0))(q, k, v, None)).abs().max() > 1e-2, "the cap must change these scores"


def test_embedding_multiplier_rounding_follows_the_source_model() -> None:
    from plugtron_gpt.model_hooks import EmbeddingMultiplier

    x = torch.randn(4, 2, 48).to(torch.bfloat16)
    scale = 48 ** 0.5
    gemma = EmbeddingMultiplier(scale, cast=True)(None, None, x)
    granite = EmbeddingMultiplier(scale, cast=False)(None, None, x)
    assert torch.equal(gemma, x * torch.tensor(scale).to(torch.bfloat16)) and torch.equal(granite, x * scale)
    assert not torch.equal(gemma, granite), "in bf16 the two conventions differ"


VARIANT = dict(layernorm_zero_centered_gamma=True, norm_placement="sandwich", qk_layernorm=True, window_size=[3, 0],
               window_attn_skip_freq=2, rotary_base_local=10000.0, rotary_base=500000, attention_softcap=20.0,
               final_logit_softcap=15.0, embedding_multiplier=8.0, residual_multiplier=0.7, num_layers=2)
OLMO = dict(norm_placement="post", qk_layernorm=True, qk_norm_scope="full", logits_divisor=2.0)


@pytest.mark.parametrize("overrides", [VARIANT, OLMO], ids=["gemma-like", "olmo-like"])
def test_meta_build_equals_eager_build(tiny_config, build, overrides: dict) -> None:
    """Norm weights are constants (0 with zero-centred gamma), TP attributes and local RoPE survive, same function.

    Random matrices are drawn in another order after materialisation (see
    test_gpt_meta.py), so the meta model gets the eager weights to compare logits.
    """
    eager, meta = build(tiny_config(**overrides)), build(tiny_config(**overrides), meta=True)
    models = [b.chunks[0] for b in (eager, meta)]
    params = [dict(m.named_parameters()) for m in models]
    assert list(params[0]) == list(params[1])
    for name, param in params[0].items():
        twin = params[1][name]
        assert not twin.is_meta and twin.shape == param.shape, name
        assert getattr(twin, "tensor_model_parallel", False) == getattr(param, "tensor_model_parallel", False), name
        if "norm" in name:
            assert torch.equal(twin, param) and param.unique().numel() == 1, name
    for mine, theirs in zip(models[0].decoder.layers, models[1].decoder.layers):
        if mine.local_rotary_pos_emb is not None:
            assert torch.equal(mine.local_rotary_pos_emb.inv_freq, theirs.local_rotary_pos_emb.inv_freq)
    with torch.no_grad():
        for name, param in params[0].items():
            params[1][name].copy_(param)
    batch = eager.context.builder.random_batch(2, 10)
    batch.pop("labels")
    with torch.no_grad():
        logits = [eager.context.builder.forward_step(m.eval(), batch) for m in models]
    assert torch.equal(*logits)


def test_variant_models_train(tiny_config, build, train_step) -> None:
    train_step(build(tiny_config(**VARIANT)))
    train_step(build(tiny_config(**OLMO, mtp_num_layers=1)))  # MTP copies the variant layer; no pre-norm to copy


def test_mtp_takes_the_final_norm_class_without_pre_norms(tiny_config, build) -> None:
    model = build(tiny_config(**OLMO, mtp_num_layers=1)).chunks[0]
    layer = model.mtp.layers[0]
    assert type(layer.enorm).__name__ == "RMSNorm" and type(layer.transformer_layer.input_layernorm).__name__ == "IdentityOp"
    assert type(layer.transformer_layer.post_mlp_layernorm).__name__ == "RMSNorm"
