"""The shared pipeline on a real megatron GPT: meta vs eager, precision, wrap rules, hooks."""

from __future__ import annotations

import pytest
import torch

from plugtron import hookimpl
from plugtron.builder import BuildOptions, ModelBuilder
from plugtron.errors import PipelineError
from plugtron.manager import PlugtronPluginManager
from plugtron.pipeline import build_model, build_with_builder
from plugtron.runtime.parallel import initialize_parallel


def _build(config, **options):
    return build_model(config, options=BuildOptions(**options), pm=PlugtronPluginManager())


def test_meta_build_matches_eager_build(gpt_config):
    eager = _build(gpt_config()).chunks[0]
    meta = _build(gpt_config(), meta_device=True).chunks[0]
    eager_params, meta_params = dict(eager.named_parameters()), dict(meta.named_parameters())
    assert eager_params.keys() == meta_params.keys()
    for name, ref in eager_params.items():
        got = meta_params[name]
        assert not got.is_meta and got.shape == ref.shape and got.dtype == ref.dtype, name
        assert got.mean().item() == pytest.approx(ref.mean().item(), abs=0.01), name
        assert got.std().item() == pytest.approx(ref.std().item(), rel=0.2, abs=1e-6), name
        for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
            assert getattr(got, attr, None) == getattr(ref, attr, None), (name, attr)
    for (name, ref), (_, got) in zip(eager.named_buffers(), meta.named_buffers()):
        assert torch.equal(ref, got), name
    assert torch.equal(eager.rotary_pos_emb.inv_freq, meta.rotary_pos_emb.inv_freq)
    assert not meta.rotary_pos_emb.inv_freq.is_meta


def test_meta_construction_skips_random_init_and_restores_the_config(gpt_config):
    on_meta = []

    def counting_init(tensor):
        on_meta.append(tensor.is_meta)
        torch.nn.init.normal_(tensor, std=0.02)

    config = gpt_config(init_method=counting_init, output_layer_init_method=counting_init)
    chunk = _build(config, meta_device=True).chunks[0]
    assert on_meta and not any(on_meta)  # only materialisation initialised, on real tensors
    assert config.transformer.init_method is counting_init
    assert config.transformer.output_layer_init_method is counting_init
    qkv = chunk.decoder.layers[0].self_attention.linear_qkv.weight
    assert (qkv.tensor_model_parallel, qkv.partition_dim) == (True, 0)  # set in megatron's init path


def test_meta_build_needs_cpu_initialization(gpt_config):
    with pytest.raises(PipelineError, match="use_cpu_initialization=True"):
        _build(gpt_config(use_cpu_initialization=False), meta_device=True)


def test_float16module_bf16(gpt_config):
    from megatron.core.transformer.module import Float16Module

    built = _build(gpt_config(bf16=True, params_dtype=torch.bfloat16))
    chunk = built.chunks[0]
    assert isinstance(chunk, Float16Module)
    assert {p.dtype for p in chunk.parameters()} == {torch.bfloat16}
    batch = built.context.builder.random_batch(2, 8)
    loss = built.context.builder.forward_step(chunk, batch)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    loss.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in chunk.parameters())


def test_megatron_fsdp_is_refused_on_cpu(gpt_config):
    with pytest.raises(PipelineError, match="megatron_fsdp' needs CUDA.*use wrap 'fsdp2'"):
        _build(gpt_config(), wrap="megatron_fsdp")


def test_wrap_hooks_run_in_documented_order_and_may_replace_chunks(gpt_config):
    calls = []

    class First:
        @hookimpl(tryfirst=True)
        def plugtron_pre_wrap(self, model, config, context):
            calls.append("plugin tryfirst")

    class Replacer:
        @hookimpl
        def plugtron_pre_wrap(self, model, config, context):
            calls.append("plugin replaces")
            return [torch.nn.Sequential(model[0])]

    class Post:
        @hookimpl
        def plugtron_post_wrap(self, model, config, context):
            calls.append(f"post sees {type(model[0]).__name__}")

    pm = PlugtronPluginManager()
    for plugin in (First(), Replacer(), Post()):
        pm.register(plugin, name=type(plugin).__name__)
    config = gpt_config().finalize()
    builder = pm.hooks.create_builder(config, pm.family("gpt"))
    builder.register_pre_wrap_hook(lambda m, c, ctx: calls.append("per-call"))
    builder.register_pre_wrap_hook(lambda m, c, ctx: calls.append("per-call prepended"), prepend=True)
    built = build_with_builder(builder, initialize_parallel(), pm)
    assert calls == ["plugin tryfirst", "plugin replaces", "per-call prepended", "per-call", "post sees Sequential"]
    assert isinstance(built.chunks[0], torch.nn.Sequential)


class _MetaBufferBuilder(ModelBuilder):
    """A stage whose buffer is computed on whatever device is current (a known trap)."""

    def build_stage(self, *, pre_process, post_process, vp_stage, pg_collection):
        module = torch.nn.Linear(4, 4)
        module.register_buffer("table", torch.arange(4.0))
        return module


def test_buffer_lost_on_meta_is_an_error_naming_it(gpt_config):
    from plugtron.records import LayerSpecInfo

    class Specs:
        @hookimpl
        def plugtron_register_layer_specs(self):
            return [LayerSpecInfo(family="gpt", name="none", factory="builtins:dict", check="plugtron.records:Availability.yes", priority=999)]

    pm = PlugtronPluginManager()
    pm.register(Specs(), name="specs")
    builder = _MetaBufferBuilder(gpt_config().finalize())
    with pytest.raises(PipelineError, match="buffers were created on the meta device.*table"):
        build_with_builder(builder, initialize_parallel(), pm, BuildOptions(meta_device=True))


def test_cpu_runtime_maps_cuda_requests_to_cpu():
    from plugtron.runtime import cpu

    assert not torch.cuda.is_available() and cpu.enable_if_needed()
    assert torch.ones(2, device="cuda").device.type == "cpu"
    assert torch.zeros(2).cuda().device.type == "cpu"
    assert torch.cuda.current_device() == torch.device("cpu")
