"""Registration and layer-spec choice of the mamba family.

Only the availability probes (``plugtron.availability.module_present`` / ``cuda_present``) are faked, to
show what ``auto`` would choose on a GPU machine; nothing GPU-only is built.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from plugtron import availability
from plugtron.errors import LayerSpecError, PipelineError
from plugtron.layer_specs import select_layer_spec
from plugtron_mamba import specs


@pytest.fixture
def pm(plugtron_manager_factory):
    return plugtron_manager_factory(load_entrypoints=True)


def _fake(monkeypatch, present: set[str], cuda: bool) -> None:
    monkeypatch.setattr(availability, "module_present", lambda module: module in present)
    monkeypatch.setattr(availability, "cuda_present", lambda: cuda)


def test_family_and_specs_are_registered(pm):
    family = pm.family("mamba")
    assert family.config_class == "plugtron_mamba.config:MambaModelConfig"
    assert family.builder_class == "plugtron_mamba.builder:MambaModelBuilder"
    assert family.distribution == "plugtron-mamba"
    offered = {info.name: info for info in pm.layer_specs("mamba")}
    assert set(offered) == {"mamba_ssm", "torch"}
    assert offered["mamba_ssm"].priority > offered["torch"].priority
    assert offered["torch"].cpu_capable and not offered["mamba_ssm"].cpu_capable


def test_auto_picks_torch_here_and_says_why_mamba_ssm_was_skipped(pm):
    if specs.mamba_ssm_available().ok:
        pytest.skip("this machine can run the mamba_ssm spec")
    choice = select_layer_spec(pm, "mamba", "auto")
    assert choice.info.name == "torch"
    assert "skipped mamba_ssm" in choice.reason


def test_requesting_mamba_ssm_names_the_missing_packages(pm, monkeypatch):
    _fake(monkeypatch, {"transformer_engine"}, cuda=False)
    with pytest.raises(LayerSpecError) as info:
        select_layer_spec(pm, "mamba", "mamba_ssm")
    message = str(info.value)
    assert "mamba_ssm (pip install mamba-ssm)" in message and "causal_conv1d (pip install causal-conv1d)" in message
    assert "transformer_engine (" not in message


def test_requesting_mamba_ssm_without_cuda_says_so(pm, monkeypatch):
    _fake(monkeypatch, set(specs.GPU_MODULES), cuda=False)
    with pytest.raises(LayerSpecError, match="CUDA is not available"):
        select_layer_spec(pm, "mamba", "mamba_ssm")


def test_auto_would_pick_mamba_ssm_on_a_gpu_machine_with_the_kernels(pm, monkeypatch):
    _fake(monkeypatch, set(specs.GPU_MODULES), cuda=True)
    choice = select_layer_spec(pm, "mamba", "auto")
    assert choice.info.name == "mamba_ssm"
    _fake(monkeypatch, set(specs.GPU_MODULES) - {"causal_conv1d"}, cuda=True)
    assert select_layer_spec(pm, "mamba", "auto").info.name == "torch"


def test_really_unavailable_here_is_reported_by_the_real_check():
    """No faking: on this CPU machine the check must say no, with a reason."""
    import torch

    result = specs.mamba_ssm_available()
    if torch.cuda.is_available() and all(availability.module_present(m) for m in specs.GPU_MODULES):
        assert result.ok
    else:
        assert not result.ok and result.reason


def test_build_with_mamba_ssm_requested_fails_before_any_tensor(tiny_config, plugtron_single_rank):
    if specs.mamba_ssm_available().ok:
        pytest.skip("this machine can run the mamba_ssm spec")
    from plugtron.pipeline import build_model

    with pytest.raises(LayerSpecError, match="mamba_ssm"):
        build_model(tiny_config(layer_spec="mamba_ssm"), parallel=plugtron_single_rank)


def test_named_torch_spec_builds(tiny_config, build):
    built = build(tiny_config(layer_spec="torch"))
    assert built.report.layer_spec == "torch" and built.report.spec_reason.startswith("requested")


def test_megatron_stack_refuses_virtual_pipeline_with_a_clear_error(tiny_config):
    from plugtron_mamba.builder import MambaModelBuilder

    builder = MambaModelBuilder(tiny_config().finalize())
    with pytest.raises(PipelineError, match="virtual pipeline"):
        builder._megatron_model(spec=None, kwargs={}, vp_stage=1)


def test_mixer_arguments_reach_the_mixer(tiny_config, build):
    mixer = build(tiny_config(mamba_conv_kernel=3, mamba_chunk_size=5)).chunks[0].decoder.layers[0].mixer
    assert (mixer.d_conv, mixer.chunk_size, mixer.expand) == (3, 5, 2)
    assert mixer.conv1d.weight.shape == (192, 1, 3)


def test_plugin_module_imports_without_torch():
    code = "import sys, plugtron_mamba.plugin, plugtron_mamba; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
