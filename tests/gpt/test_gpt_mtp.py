"""Multi-token prediction: backend, loss reporting, gradients, inference and config round trip.

megatron-core 0.16.1 keeps the MTP loss out of the value ``GPTModel`` returns:
it records it in ``MTPLossLoggingHelper.tracker`` and injects its gradient in
the backward pass. These tests pin down what ``GPTModelBuilder`` makes of that.
"""

from __future__ import annotations

import math

import pytest
import torch

from plugtron.config import load, save

SPECS = ["torch", "local"]


def mtp_params(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.startswith("mtp.")}


def backward_once(built, seed: int = 0) -> torch.Tensor:
    model, builder = built.chunks[0], built.context.builder
    model.train()
    loss = builder.forward_step(model, builder.random_batch(2, 16, seed=seed))
    loss.mean().backward()
    return loss


@pytest.mark.parametrize("spec", SPECS)
def test_mtp_uses_the_chosen_backend(tiny_config, build, spec: str) -> None:
    model = build(tiny_config(mtp_num_layers=2, qk_layernorm=True, layer_spec=spec)).chunks[0]
    main = model.decoder.layers[0]
    assert len(model.mtp.layers) == 2
    for layer in model.mtp.layers:
        for norm in (layer.enorm, layer.hnorm, layer.final_layernorm):
            assert type(norm) is type(main.input_layernorm)
        assert type(layer.eh_proj) is type(main.self_attention.linear_qkv)
        attention = layer.transformer_layer.self_attention
        assert type(attention.core_attention) is type(main.self_attention.core_attention)
        assert type(attention.q_layernorm) is type(main.self_attention.q_layernorm)
    expected = "SDPACoreAttention" if spec == "torch" else "DotProductAttention"
    assert type(main.self_attention.core_attention).__name__ == expected


@pytest.mark.parametrize("spec", SPECS)
def test_mtp_loss_is_reported_and_trains_the_mtp_layers(tiny_config, build, spec: str) -> None:
    built = build(tiny_config(mtp_num_layers=2, layer_spec=spec))
    builder = built.context.builder
    builder.mtp_losses(reset=True)  # forget what earlier tests recorded
    backward_once(built)
    losses = builder.mtp_losses()
    assert losses.shape == (2,)
    assert losses.isfinite().all() and (losses > 0).all()
    assert (losses < 3 * math.log(128)).all(), "an untrained model predicts about uniformly"
    params = mtp_params(built.chunks[0])
    assert params, "the model has no MTP parameters"
    for name, param in params.items():
        assert param.grad is not None and param.grad.isfinite().all() and param.grad.abs().sum() > 0, name
    assert torch.equal(builder.mtp_losses(), torch.zeros(2)), "reset=True must clear the recorded losses"


def test_mtp_losses_accumulate_until_reset(tiny_config, build) -> None:
    built = build(tiny_config(mtp_num_layers=1))
    builder = built.context.builder
    builder.mtp_losses(reset=True)
    backward_once(built)
    first = builder.mtp_losses(reset=False)
    backward_once(built)
    torch.testing.assert_close(builder.mtp_losses(), 2 * first)


def test_mtp_loss_is_not_recorded_in_eval_mode(tiny_config, build) -> None:
    built = build(tiny_config(mtp_num_layers=1))
    model, builder = built.chunks[0], built.context.builder
    builder.mtp_losses(reset=True)
    model.eval()
    with torch.no_grad():
        builder.forward_step(model, builder.random_batch(2, 8))
    assert torch.equal(builder.mtp_losses(), torch.zeros(1))


def test_mtp_loss_scaling_factor_scales_the_mtp_gradients(tiny_config, build) -> None:
    """MTP layers feed only the MTP loss, so their gradients are proportional to the factor."""
    grads, recorded = {}, {}
    for factor in (0.1, 0.3):
        built = build(tiny_config(mtp_num_layers=1, mtp_loss_scaling_factor=factor))
        built.context.builder.mtp_losses(reset=True)
        backward_once(built)
        recorded[factor] = built.context.builder.mtp_losses()
        grads[factor] = {n: p.grad.clone() for n, p in mtp_params(built.chunks[0]).items()}
    torch.testing.assert_close(recorded[0.1], recorded[0.3])
    for name, grad in grads[0.1].items():
        torch.testing.assert_close(grads[0.3][name], 3 * grad, rtol=1e-4, atol=1e-8)


def test_tracker_follows_a_model_with_more_mtp_layers(tiny_config, build) -> None:
    """megatron sizes its tracker once; a later model with more MTP layers must still train."""
    backward_once(build(tiny_config(mtp_num_layers=1)))
    built = build(tiny_config(mtp_num_layers=3))
    backward_once(built)
    losses = built.context.builder.mtp_losses()
    assert losses.shape == (3,) and (losses > 0).all()


def test_no_mtp_means_no_mtp_losses(tiny_config, build) -> None:
    built = build(tiny_config())
    assert not hasattr(built.chunks[0], "mtp")
    assert built.context.builder.mtp_losses() is None


def test_forward_without_labels_gives_the_main_head_logits(tiny_config, build) -> None:
    """Inference skips the MTP block (megatron 0.16.1 fails on it without labels)."""
    with_mtp = build(tiny_config(mtp_num_layers=2)).chunks[0]
    plain_built = build(tiny_config())
    plain, builder = plain_built.chunks[0], plain_built.context.builder
    state = {k: v for k, v in with_mtp.state_dict().items() if not k.startswith("mtp.")}
    result = plain.load_state_dict(state, strict=False)
    assert not result.missing_keys
    batch = builder.random_batch(2, 8)
    batch.pop("labels")
    with torch.no_grad():
        expected = builder.forward_step(plain.eval(), batch)
        actual = builder.forward_step(with_mtp.eval(), batch)
    assert actual.shape == (2, 8, 128)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert with_mtp.mtp_process and with_mtp.config.mtp_num_layers == 2, "MTP must be restored afterwards"


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_mtp_survives_config_save_and_load(tiny_config, build, tmp_path, suffix: str) -> None:
    config = tiny_config(mtp_num_layers=2, mtp_loss_scaling_factor=0.25)
    loaded = load(save(config, tmp_path / f"mtp{suffix}"))
    assert loaded.mtp_num_layers == 2 and loaded.mtp_loss_scaling_factor == 0.25
    model = build(loaded).chunks[0]
    assert len(model.mtp.layers) == 2 and model.config.mtp_loss_scaling_factor == 0.25


def test_a_stale_gradient_scale_does_not_leak_into_forward_step(tiny_config, build, monkeypatch) -> None:
    """megatron's schedules leave MTPLossAutoScaler's process-wide scale at 1 / micro-batches."""
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

    grads = []
    for stale in (None, torch.tensor(0.25)):
        if stale is not None:
            monkeypatch.setattr(MTPLossAutoScaler, "main_loss_backward_scale", stale)
        built = build(tiny_config(mtp_num_layers=1))
        backward_once(built)
        grads.append({n: p.grad.clone() for n, p in mtp_params(built.chunks[0]).items()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=0, atol=0)


def test_megatron_schedule_weights_mtp_like_forward_step(tiny_config, build) -> None:
    """Through megatron's schedule (``plugtron build --step``) two micro-batches give the mean of two direct steps."""
    from plugtron.training import forward_backward

    direct = build(tiny_config(mtp_num_layers=1))
    for seed in (0, 1):
        backward_once(direct, seed=seed)
    scheduled = build(tiny_config(mtp_num_layers=1))
    builder = scheduled.context.builder
    forward_backward(scheduled, [builder.random_batch(2, 16, seed=s) for s in (0, 1)])
    expected = dict(direct.chunks[0].named_parameters())
    for name, param in scheduled.chunks[0].named_parameters():
        torch.testing.assert_close(param.grad, expected[name].grad / 2, rtol=1e-4, atol=1e-7, msg=name)
