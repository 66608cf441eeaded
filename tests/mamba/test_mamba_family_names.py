"""Parameter names and shapes equal those of megatron's MambaModel for the same config.

The expected tables are written out by hand from megatron-core 0.16.1's source
(``models/mamba/mamba_layer_specs.py``, ``ssm/mamba_block.py``,
``ssm/mamba_layer.py``, ``ssm/mamba_mixer.py``, ``models/mamba/mamba_model.py``):

* the stack spec fuses each layer's input norm into its first projection
  (``TELayerNormColumnParallelLinear``): ``mixer.in_proj.layer_norm_weight``,
  ``self_attention.linear_qkv.layer_norm_weight``, ``mlp.linear_fc1.layer_norm_weight``
  (plus ``layer_norm_bias`` with LayerNorm); ``MambaLayer.norm`` is an IdentityOp;
* the mixer: ``in_proj`` rows ``2 d_inner + 2 G N + H`` with no bias, depthwise
  ``conv1d`` over ``d_inner + 2 G N`` channels with bias, ``dt_bias``/``A_log``/``D``
  per head, gated ``norm.weight`` over ``d_inner``, ``out_proj`` without bias;
* ``MambaStack.final_norm`` (TENorm) and ``MambaModel.output_layer`` (no bias; not
  allocated on a single stage with tied embeddings).

Tiny config: hidden 64, vocab 100 -> padded 128, Mamba d_inner 128 (expand 2),
8 heads of 16, 2 groups, state 16, conv kernel 4; 4 attention heads of 16; ffn 96.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

RMS_UNTIED_M_ATT_M_MLP = {
    "embedding.word_embeddings.weight": (128, 64),
    "decoder.layers.0.mixer.in_proj.weight": (328, 64),
    "decoder.layers.0.mixer.in_proj.layer_norm_weight": (64,),
    "decoder.layers.0.mixer.conv1d.weight": (192, 1, 4),
    "decoder.layers.0.mixer.conv1d.bias": (192,),
    "decoder.layers.0.mixer.dt_bias": (8,),
    "decoder.layers.0.mixer.A_log": (8,),
    "decoder.layers.0.mixer.D": (8,),
    "decoder.layers.0.mixer.norm.weight": (128,),
    "decoder.layers.0.mixer.out_proj.weight": (64, 128),
    "decoder.layers.1.self_attention.linear_qkv.weight": (192, 64),
    "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight": (64,),
    "decoder.layers.1.self_attention.linear_proj.weight": (64, 64),
    "decoder.layers.2.mixer.in_proj.weight": (328, 64),
    "decoder.layers.2.mixer.in_proj.layer_norm_weight": (64,),
    "decoder.layers.2.mixer.conv1d.weight": (192, 1, 4),
    "decoder.layers.2.mixer.conv1d.bias": (192,),
    "decoder.layers.2.mixer.dt_bias": (8,),
    "decoder.layers.2.mixer.A_log": (8,),
    "decoder.layers.2.mixer.D": (8,),
    "decoder.layers.2.mixer.norm.weight": (128,),
    "decoder.layers.2.mixer.out_proj.weight": (64, 128),
    "decoder.layers.3.mlp.linear_fc1.weight": (96, 64),
    "decoder.layers.3.mlp.linear_fc1.layer_norm_weight": (64,),
    "decoder.layers.3.mlp.linear_fc2.weight": (64, 96),
    "decoder.final_norm.weight": (64,),
    "output_layer.weight": (128, 64),
}

# LayerNorm, biases on attention/MLP linears, SwiGLU, learned positions, tied output; pattern "*M-M".
LN_BIAS_TIED_ATT_M_MLP_M = {
    "embedding.word_embeddings.weight": (128, 64),
    "embedding.position_embeddings.weight": (32, 64),
    "decoder.layers.0.self_attention.linear_qkv.weight": (192, 64),
    "decoder.layers.0.self_attention.linear_qkv.bias": (192,),
    "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight": (64,),
    "decoder.layers.0.self_attention.linear_qkv.layer_norm_bias": (64,),
    "decoder.layers.0.self_attention.linear_proj.weight": (64, 64),
    "decoder.layers.0.self_attention.linear_proj.bias": (64,),
    "decoder.layers.1.mixer.in_proj.weight": (328, 64),
    "decoder.layers.1.mixer.in_proj.layer_norm_weight": (64,),
    "decoder.layers.1.mixer.in_proj.layer_norm_bias": (64,),
    "decoder.layers.1.mixer.conv1d.weight": (192, 1, 4),
    "decoder.layers.1.mixer.conv1d.bias": (192,),
    "decoder.layers.1.mixer.dt_bias": (8,),
    "decoder.layers.1.mixer.A_log": (8,),
    "decoder.layers.1.mixer.D": (8,),
    "decoder.layers.1.mixer.norm.weight": (128,),
    "decoder.layers.1.mixer.out_proj.weight": (64, 128),
    "decoder.layers.2.mlp.linear_fc1.weight": (192, 64),
    "decoder.layers.2.mlp.linear_fc1.bias": (192,),
    "decoder.layers.2.mlp.linear_fc1.layer_norm_weight": (64,),
    "decoder.layers.2.mlp.linear_fc1.layer_norm_bias": (64,),
    "decoder.layers.2.mlp.linear_fc2.weight": (64, 96),
    "decoder.layers.2.mlp.linear_fc2.bias": (64,),
    "decoder.layers.3.mixer.in_proj.weight": (328, 64),
    "decoder.layers.3.mixer.in_proj.layer_norm_weight": (64,),
    "decoder.layers.3.mixer.in_proj.layer_norm_bias": (64,),
    "decoder.layers.3.mixer.conv1d.weight": (192, 1, 4),
    "decoder.layers.3.mixer.conv1d.bias": (192,),
    "decoder.layers.3.mixer.dt_bias": (8,),
    "decoder.layers.3.mixer.A_log": (8,),
    "decoder.layers.3.mixer.D": (8,),
    "decoder.layers.3.mixer.norm.weight": (128,),
    "decoder.layers.3.mixer.out_proj.weight": (64, 128),
    "decoder.final_norm.weight": (64,),
    "decoder.final_norm.bias": (64,),
}


def _table(model) -> dict:
    return {name: tuple(param.shape) for name, param in model.named_parameters()}


def test_rmsnorm_hybrid_names_and_shapes(tiny_config, build):
    model = build(tiny_config()).chunks[0]
    assert _table(model) == RMS_UNTIED_M_ATT_M_MLP


def test_layernorm_bias_tied_glu_names_and_shapes(tiny_config, build):
    import torch

    config = tiny_config(
        hybrid_override_pattern="*M-M", normalization="LayerNorm", add_bias_linear=True,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        position_embedding_type="learned_absolute", share_embeddings_and_output_weights=True,
    )
    model = build(config).chunks[0]
    assert _table(model) == LN_BIAS_TIED_ATT_M_MLP_M
    assert model.output_layer.weight is None  # tied: the logits use the embedding weight


def test_mixer_parameters_keep_megatrons_dtypes_and_tp_flags(tiny_config, build):
    import torch

    # params_dtype alone: with bf16=True megatron's Float16Module would cast every parameter
    mixer = build(tiny_config(params_dtype=torch.bfloat16)).chunks[0].decoder.layers[0].mixer
    assert mixer.A_log.dtype == mixer.D.dtype == torch.float32  # megatron keeps these in fp32
    assert mixer.in_proj.weight.dtype == torch.bfloat16
    for name in ("A_log", "D", "dt_bias"):
        assert getattr(mixer, name).tensor_model_parallel
    assert not mixer.in_proj.layer_norm_weight.tensor_model_parallel


def test_layer_numbers_are_global_and_one_based(tiny_config, build):
    model = build(tiny_config()).chunks[0]
    assert [layer.layer_number for layer in model.decoder.layers] == [1, 2, 3, 4]
    assert [type(layer).__name__ for layer in model.decoder.layers] == ["MambaLayer", "TransformerLayer", "MambaLayer", "TransformerLayer"]


def test_sharded_state_dict_keys_are_the_parameter_names(tiny_config, build):
    """Distributed checkpoints use megatron's keys (in_proj/conv1d saved as named pieces inside the factory)."""
    model = build(tiny_config()).chunks[0]
    keys = {k for k in model.sharded_state_dict() if not k.endswith("_extra_state")}
    assert keys == set(RMS_UNTIED_M_ATT_M_MLP)


class _Group:
    def __init__(self, rank: int, size: int) -> None:
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


@pytest.mark.parametrize(
    ("pp", "first", "last"), [(2, None, None), (4, None, None), (3, 3, None), (3, None, 3), (3, 3, 3), (4, 1, 2)]
)
def test_pipeline_split_equals_megatrons_mamba_stack(pp, first, last):
    """Our stage selection (megatron's transformer-layer functions) picks what MambaStack picks."""
    from megatron.core.ssm.mamba_block import MambaStack
    from megatron.core.transformer import TransformerConfig

    from plugtron_mamba.stack import stage_layers

    layers = 8 if first is None and last is None else 9
    pattern = "M*M-MM*-M"[:layers]
    config = TransformerConfig(
        num_layers=layers, hidden_size=64, num_attention_heads=4, pipeline_model_parallel_size=pp,
        num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last,
        pipeline_dtype=__import__("torch").float32,
    )
    stages = []
    for rank in range(pp):
        fake = SimpleNamespace(config=config, pp_group=_Group(rank, pp))
        theirs = MambaStack._select_layers_for_pipeline_parallel(fake, list(pattern))
        offset, ours = stage_layers(config, pattern, None, rank)
        assert (offset, ours) == (theirs[0], "".join(theirs[1]))
        stages.append(ours)
    assert "".join(stages) == pattern
