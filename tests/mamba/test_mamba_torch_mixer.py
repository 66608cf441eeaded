"""TorchMambaMixer: megatron parameter layout, HF numerics, gradients, limits.

Layout facts below were read from megatron-core 0.16.1
``megatron/core/ssm/mamba_mixer.py`` (which cannot be imported here: it needs
Triton).  For d_model=64, d_state=16, headdim=16, ngroups=2, expand=2, d_conv=4
and TP=1: d_inner=128, nheads=8, in_proj rows = 2*128 + 2*2*16 + 8 = 328 laid out
[z 128 | x 128 | B 32 | C 32 | dt 8], conv channels = 128 + 2*2*16 = 192 laid
out [x | B | C].
"""

from __future__ import annotations

from typing import Any, Callable, Dict

import pytest
import torch

hf_mamba2 = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
transformers = pytest.importorskip("transformers")

# name -> (shape, dtype, tensor_model_parallel flag set by megatron's mixer)
EXPECTED_PARAMETERS: Dict[str, tuple] = {
    "dt_bias": ((8,), torch.float32, True),
    "A_log": ((8,), torch.float32, True),
    "D": ((8,), torch.float32, True),
    "in_proj.weight": ((328, 64), torch.float32, True),  # ColumnParallelLinear sets it
    "conv1d.weight": ((192, 1, 4), torch.float32, True),
    "conv1d.bias": ((192,), torch.float32, True),
    "norm.weight": ((128,), torch.float32, True),
    "out_proj.weight": ((64, 128), torch.float32, True),  # RowParallelLinear sets it
}

MixerFactory = Callable[..., Any]


def _hf_mixer(chunk_size: int = 8) -> Any:
    config = transformers.Mamba2Config(
        hidden_size=64,
        state_size=16,
        head_dim=16,
        n_groups=2,
        expand=2,
        conv_kernel=4,
        chunk_size=chunk_size,
        num_heads=8,  # expand * hidden_size / head_dim
        num_hidden_layers=1,
        layer_norm_epsilon=1e-5,  # megatron's gated norm uses 1e-5
        use_bias=False,
        use_conv_bias=True,
    )
    return hf_mamba2.Mamba2Mixer(config, layer_idx=0).eval()


def _copy_into_hf(mixer: Any, hf: Any) -> None:
    """Names coincide and the in_proj row layout is the same ([z | xBC | dt] in HF,
    [z | x | B | C | dt] in megatron, with xBC = [x | B | C]), so it is a plain copy."""
    ours = dict(mixer.named_parameters())
    with torch.no_grad():
        for name, param in hf.named_parameters():
            param.copy_(ours[name])


def _randomise(mixer: Any, seed: int = 1) -> None:
    """Move norm/D/dt away from their trivial initial values so every term matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        mixer.norm.weight.copy_(1 + 0.3 * torch.randn(mixer.norm.weight.shape, generator=gen))
        mixer.D.copy_(torch.randn(mixer.D.shape, generator=gen))
        mixer.dt_bias.add_(0.5 * torch.randn(mixer.dt_bias.shape, generator=gen))


def test_parameters_match_megatron_layout(make_mixer: MixerFactory) -> None:
    mixer = make_mixer()
    params = dict(mixer.named_parameters())
    assert list(params) == list(EXPECTED_PARAMETERS)  # same registration order too
    for name, (shape, dtype, tp_flag) in EXPECTED_PARAMETERS.items():
        assert tuple(params[name].shape) == shape, name
        assert params[name].dtype == dtype, name
        assert getattr(params[name], "tensor_model_parallel", False) is tp_flag, name
    tensors = [k for k in mixer.state_dict() if not k.endswith("_extra_state")]
    assert sorted(tensors) == sorted(EXPECTED_PARAMETERS)
    assert (mixer.nheads_local_tp, mixer.ngroups_local_tp, mixer.d_inner_local_tp) == (8, 2, 128)
    assert mixer.norm.group_size == 64 and mixer.norm.eps == 1e-5


def test_initialisation_follows_megatron(make_mixer: MixerFactory) -> None:
    mixer = make_mixer(seed=3, A_init_range=(2, 5), dt_min=0.01, dt_max=0.2)
    A = torch.exp(mixer.A_log)
    assert ((A >= 2) & (A <= 5)).all()
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert ((dt >= 0.01 - 1e-6) & (dt <= 0.2 + 1e-6)).all()
    assert torch.equal(mixer.D, torch.ones(8))
    assert torch.equal(mixer.norm.weight, torch.ones(128))
    bound = 1 / 2  # kaiming_uniform(a=sqrt(5)) on fan_in = d_conv = 4
    assert mixer.conv1d.weight.abs().max() <= bound
    conv_init = make_mixer(conv_init=0.01).conv1d.weight
    assert conv_init.abs().max() <= 0.01


@pytest.mark.parametrize("seqlen", [8, 13])
def test_forward_matches_transformers_mamba2(make_mixer: MixerFactory, seqlen: int) -> None:
    mixer = make_mixer(seed=seqlen)
    _randomise(mixer, seed=seqlen)
    hf = _hf_mixer(chunk_size=8)
    _copy_into_hf(mixer, hf)
    x = torch.randn(2, seqlen, 64, generator=torch.Generator().manual_seed(seqlen))
    with torch.no_grad():
        expected = hf(x)  # [b, l, d]; pure-torch path since mamba_ssm is absent
        out, bias = mixer(x.transpose(0, 1).contiguous())  # megatron layout [s, b, d]
    assert bias is None
    assert out.shape == (seqlen, 2, 64)
    assert (out.transpose(0, 1) - expected).abs().max().item() <= 1e-4


def test_output_does_not_depend_on_chunk_size(make_mixer: MixerFactory) -> None:
    a, b = make_mixer(seed=4, chunk_size=8), make_mixer(seed=4, chunk_size=5)
    b.load_state_dict(a.state_dict())
    x = torch.randn(21, 3, 64)
    with torch.no_grad():
        torch.testing.assert_close(a(x)[0], b(x)[0], atol=1e-5, rtol=1e-5)


def test_state_dict_round_trip_and_causality(make_mixer: MixerFactory) -> None:
    a, b = make_mixer(seed=5), make_mixer(seed=6)
    b.load_state_dict(a.state_dict())
    x = torch.randn(12, 2, 64)
    with torch.no_grad():
        out = a(x)[0]
        torch.testing.assert_close(out, b(x)[0])
        # Changing the future must not change the past.
        x2 = x.clone()
        x2[7:] = torch.randn(5, 2, 64)
        torch.testing.assert_close(a(x2)[0][:7], out[:7])


def test_backward_gives_finite_nonzero_gradients(make_mixer: MixerFactory) -> None:
    mixer = make_mixer(seed=7).train()
    _randomise(mixer, seed=7)
    x = torch.randn(11, 2, 64, requires_grad=True)
    out, _ = mixer(x)
    out.square().mean().backward()
    for name, param in mixer.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_D_has_hdim_matches_per_head_D(make_mixer: MixerFactory) -> None:
    per_head, per_channel = make_mixer(seed=8), make_mixer(seed=8, D_has_hdim=True)
    assert per_channel.D.shape == (128,)
    _randomise(per_head, seed=8)
    state = per_head.state_dict()
    state["D"] = state["D"].repeat_interleave(16)
    per_channel.load_state_dict(state)
    x = torch.randn(9, 2, 64)
    with torch.no_grad():
        torch.testing.assert_close(per_channel(x)[0], per_head(x)[0])


def test_without_rmsnorm_gates_with_silu(make_mixer: MixerFactory) -> None:
    mixer = make_mixer(seed=9, rmsnorm=False)
    assert not hasattr(mixer, "norm") and "norm.weight" not in mixer.state_dict()
    assert mixer(torch.randn(6, 2, 64))[0].shape == (6, 2, 64)


def test_num_heads_from_config(make_mixer: MixerFactory) -> None:
    mixer = make_mixer(config={"mamba_num_heads": 4})
    assert (mixer.nheads, mixer.d_inner) == (4, 64)
    assert mixer.in_proj.weight.shape == (2 * 64 + 2 * 2 * 16 + 4, 64)


def test_unsupported_modes_raise(make_mixer: MixerFactory) -> None:
    mixer = make_mixer()
    x = torch.randn(4, 1, 64)
    mixer.eval()
    with pytest.raises(NotImplementedError, match="inference"):
        mixer(x, inference_context=object())
    with pytest.raises(NotImplementedError, match="packed"):
        mixer(x, packed_seq_params=object())
    mixer.train()  # megatron ignores an inference context while training
    assert mixer(x, inference_context=object())[0].shape == (4, 1, 64)
    with pytest.raises(ValueError):
        make_mixer(bias=True)
    with pytest.raises(ValueError):
        make_mixer(norm_before_gate=True)
    assert mixer.mamba_state_shapes_per_request() == ((192, 4), (8, 16, 16))


def test_sharded_state_dict_uses_megatron_keys(make_mixer: MixerFactory) -> None:
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    mixer = make_mixer()
    sharded = mixer.sharded_state_dict(prefix="decoder.layers.0.mixer.")
    pre = "decoder.layers.0.mixer."
    for name in ("A_log", "dt_bias", "D", "norm.weight", "out_proj.weight"):
        assert tuple(sharded[pre + name].global_shape) == EXPECTED_PARAMETERS[name][0]
    in_proj = sharded[pre + "in_proj.weight"]
    assert isinstance(in_proj, ShardedTensorFactory)
    pieces = {p.key: tuple(p.global_shape) for p in in_proj.build()}
    assert pieces == {
        f"{pre}in_proj.weight.{k}": (n, 64)
        for k, n in {"z": 128, "x": 128, "B": 32, "C": 32, "dt": 8}.items()
    }
    conv = {p.key: tuple(p.global_shape) for p in sharded[pre + "conv1d.weight"].build()}
    sizes = {"x": 128, "B": 32, "C": 32}
    assert conv == {f"{pre}conv1d.weight.{k}": (n, 1, 4) for k, n in sizes.items()}
    merged = in_proj.merge_fn([p.data for p in in_proj.build()])
    assert torch.equal(merged, mixer.in_proj.weight)


def test_plugs_into_megatron_mamba_layer(plugtron_single_rank: Any) -> None:
    """megatron's MambaLayer builds the mixer from a ModuleSpec with its own keyword
    set (d_model, layer_number, pg_collection, pp_layer_offset)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
        from megatron.core.process_groups_config import ProcessGroupCollection
        from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
        from megatron.core.transformer import TransformerConfig
        from megatron.core.transformer.spec_utils import ModuleSpec, build_module
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        from plugtron_mamba.torch_impl import TorchMambaMixer, TorchMambaMixerSubmodules

        config = TransformerConfig(
            num_layers=1, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True,
            mamba_state_dim=16, mamba_head_dim=16, mamba_num_groups=2, normalization="RMSNorm",
        )
        mixer_spec = ModuleSpec(
            module=TorchMambaMixer,
            submodules=TorchMambaMixerSubmodules(
                in_proj=ColumnParallelLinear, out_proj=RowParallelLinear
            ),
        )
        spec = ModuleSpec(
            module=MambaLayer,
            submodules=MambaLayerSubmodules(
                norm=WrappedTorchNorm, mixer=mixer_spec, mamba_bda=get_bias_dropout_add
            ),
        )
        pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        layer = build_module(spec, config, layer_number=1, pg_collection=pg_collection)
    names = {n[len("mixer.") :] for n, _ in layer.named_parameters() if n.startswith("mixer.")}
    assert names == set(EXPECTED_PARAMETERS)
    x = torch.randn(10, 2, 64, requires_grad=True)
    out = layer(x)
    assert out.shape == (10, 2, 64)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
