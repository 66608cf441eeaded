"""Every bad input is refused before anything is written, with the culprit named.

Most go through ``plugtron.cli.main`` in this process: the checks run before
any rank starts, so they must come out as one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from plugtron.cli import main
from plugtron.errors import PlugtronError
from plugtron.manager import PlugtronPluginManager
from plugtron_hf_bridge.errors import CheckpointFormatError, ConversionError, TensorSetError, UnsupportedConfigError
from plugtron_hf_bridge.importer import plan_import

from hfb_helpers import make_hf, rewrite


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return make_hf(tmp_path_factory.mktemp("pristine") / "hf", "LlamaForCausalLM", layers=2)


@pytest.fixture
def src(tmp_path, pristine) -> Path:
    import shutil

    return Path(shutil.copytree(pristine, tmp_path / "hf"))


def convert(capsys, *argv: str) -> tuple[int, str]:
    code = main(["convert", *map(str, argv), "--no-progress"])
    err = capsys.readouterr().err.strip()
    return code, err


def expect_one_line(capsys, src: Path, dst: Path, *needles: str, extra: tuple[str, ...] = ()) -> str:
    code, err = convert(capsys, src, dst, "--to", "megatron", *extra)
    assert code == 2, err
    assert err.startswith("plugtron: error: ") and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not dst.exists() and not [p for p in dst.parent.iterdir() if p.name.startswith(".")]
    return err


def test_missing_tensors_are_all_named(capsys, src, tmp_path) -> None:
    gone = ["model.norm.weight", "model.layers.1.mlp.up_proj.weight"]
    rewrite(src, lambda t: [t.pop(n) for n in gone])
    expect_one_line(capsys, src, tmp_path / "out", "missing (2)", *gone)


def test_extra_tensor_is_named(capsys, src, tmp_path) -> None:
    rewrite(src, lambda t: t.update({"model.layers.0.mlp.extra_scale": torch.ones(3)}))
    expect_one_line(capsys, src, tmp_path / "out", "used by no mapping", "model.layers.0.mlp.extra_scale")


def test_wrong_shape_is_named_with_both_shapes(capsys, src, tmp_path) -> None:
    rewrite(src, lambda t: t.update({"model.layers.1.self_attn.k_proj.weight": torch.zeros(16, 64)}))
    expect_one_line(capsys, src, tmp_path / "out", "model.layers.1.self_attn.k_proj.weight (16, 64) != (32, 64)")


def test_truncated_safetensors_file(capsys, src, tmp_path) -> None:
    path = src / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    expect_one_line(capsys, src, tmp_path / "out", "truncated", str(path))


def test_unknown_architecture(capsys, src, tmp_path) -> None:
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = ["BertForMaskedLM"]
    (src / "config.json").write_text(json.dumps(config))
    expect_one_line(capsys, src, tmp_path / "out", "no converter for hf architecture 'BertForMaskedLM'", "LlamaForCausalLM")


def test_unknown_config_field(capsys, src, tmp_path) -> None:
    config = json.loads((src / "config.json").read_text())
    config["logit_scale"] = 2.0
    (src / "config.json").write_text(json.dumps(config))
    expect_one_line(capsys, src, tmp_path / "out", "config field 'logit_scale'", "refusing to guess")


def test_pickle_checkpoint_is_refused(capsys, src, tmp_path) -> None:
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"never unpickled")
    expect_one_line(capsys, src, tmp_path / "out", "only safetensors", "pytorch_model.bin")


def test_wrong_dtype_option(capsys, src, tmp_path) -> None:
    with pytest.raises(SystemExit) as info:  # argparse: the choices are listed
        main(["convert", str(src), str(tmp_path / "out"), "--to", "megatron", "--dtype", "float64"])
    assert info.value.code == 2 and "invalid choice: 'float64'" in capsys.readouterr().err
    with pytest.raises(ConversionError, match="'float64' is not supported; choose one of float32, bfloat16, float16"):
        plan_import(src, dtype="float64")


def test_destination_exists_is_refused_unless_overwrite(capsys, src, tmp_path) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep").write_text("old")
    code, err = convert(capsys, src, dst, "--to", "megatron")
    assert code == 2 and "already exists; pass --overwrite" in err and str(dst) in err
    assert (dst / "keep").read_text() == "old"
    code, err = convert(capsys, src, dst, "--to", "megatron", "--overwrite")
    assert code == 0, err
    assert not (dst / "keep").exists() and (dst / "plugtron_model.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]


def test_export_source_must_be_a_plugtron_checkpoint(capsys, src, tmp_path) -> None:
    code, err = convert(capsys, src, tmp_path / "out", "--to", "hf")
    assert code == 2 and "not a plugtron megatron checkpoint" in err


def test_errors_are_plugtron_errors() -> None:
    for cls in (ConversionError, CheckpointFormatError, TensorSetError, UnsupportedConfigError):
        assert issubclass(cls, PlugtronError)


class RenamedLlama:
    """A third-party adapter: another architecture name, no row layout (the importer slices whole tensors)."""

    architecture = "MyLlamaForCausalLM"
    family = "gpt"
    hf_model_class = "transformers:LlamaForCausalLM"

    def __init__(self) -> None:
        from plugtron_gpt.hf.catalogue import adapter

        self.base = adapter("LlamaForCausalLM")

    def config_from_hf(self, hf_config, *, source=None):
        return self.base.config_from_hf(hf_config, source=source)

    def config_to_hf(self, config, *, passthrough=None):
        return {**self.base.config_to_hf(config, passthrough=passthrough), "architectures": [self.architecture]}

    def tensor_mappings(self, config, *, te_fused_norms=False):
        import dataclasses

        return [dataclasses.replace(m, pieces=None) for m in self.base.tensor_mappings(config, te_fused_norms=te_fused_norms)]

    def tolerated_unused(self, name, config):
        return False


def test_third_party_adapter_found_through_the_plugin_manager(src, tmp_path) -> None:
    from plugtron import ConverterInfo, hookimpl
    from plugtron.runtime.parallel import initialize_parallel
    from plugtron_hf_bridge.verify import verify

    class Plugin:
        @hookimpl
        def plugtron_register_converters(self):
            return [ConverterInfo("hf", "MyLlamaForCausalLM", "gpt", f"{__name__}:RenamedLlama")]

    config = json.loads((src / "config.json").read_text())
    config["architectures"] = ["MyLlamaForCausalLM"]
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(PlugtronError, match="no converter"):
        plan_import(src, pm=PlugtronPluginManager())
    pm = PlugtronPluginManager()
    pm.register(Plugin(), name="my-llama")
    report = verify(src, pm=pm, parallel=initialize_parallel(1, 1))
    assert report.max_abs_diff <= 1e-4, report


def test_sigterm_during_export_leaves_nothing(tmp_path) -> None:
    """The launcher stops ranks with SIGTERM; the CLI turns it into an exception so the temp dir goes."""
    script = textwrap.dedent(f"""
        import os, signal, torch
        from plugtron.cli import terminate
        from plugtron_hf_bridge.exporter import write_hf
        signal.signal(signal.SIGTERM, terminate)
        def tensors():
            for i in range(20):
                if i == 5:
                    os.kill(os.getpid(), signal.SIGTERM)
                yield f"t{{i}}", torch.zeros(100)
        write_hf({str(tmp_path / 'out')!r}, tensors(), {{"model_type": "llama"}}, max_shard_bytes=500)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ))
    assert done.returncode == 128 + 15, done.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []
