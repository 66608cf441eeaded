"""The HF bridge's own engine on Mamba checkpoints: import, ``verify``, export, and the command line.

The bridge finds the Mamba adapters only through the plugin manager
(``pm.converter("hf", architecture)``), so these tests also prove the
registration. Exported checkpoints must equal the source bit for bit, and
their ``config.json`` key for key.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from plugtron_mamba.hf.tiny import save_tiny_hf

CASES = {"mamba2": ("Mamba2ForCausalLM", {}), "mamba2-tied": ("Mamba2ForCausalLM", {"tied": True}),
         "nemotron-h": ("NemotronHForCausalLM", {}),
         # bf16 stays bf16 (Float16Module casts A_log and D too), so the export is bit-exact as well
         "nemotron-h-bf16": ("NemotronHForCausalLM", {"dtype": "bfloat16"})}


@pytest.fixture(scope="module")
def pm() -> Any:
    from plugtron.manager import PlugtronPluginManager

    return PlugtronPluginManager()


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def _differences(a: Path, b: Path) -> list[str]:
    left, right = _tensors(a), _tensors(b)
    if set(left) != set(right):
        return sorted(set(left) ^ set(right))
    return [n for n in left if left[n].dtype != right[n].dtype or not torch.equal(left[n], right[n])]


def _config_diff(a: Path, b: Path) -> list[str]:
    left, right = (json.loads((d / "config.json").read_text()) for d in (a, b))
    return sorted(k for k in set(left) | set(right) if k != "transformers_version" and left.get(k) != right.get(k))


@pytest.mark.parametrize("case", list(CASES))
def test_engine_import_verify_export(tmp_path, plugtron_single_rank, pm, case) -> None:
    from plugtron_hf_bridge.exporter import export_hf
    from plugtron_hf_bridge.importer import import_hf
    from plugtron_hf_bridge.verify import verify

    arch, kwargs = CASES[case]
    src = save_tiny_hf(tmp_path / "hf", arch, **kwargs)
    imported = import_hf(src, pm=pm, parallel=plugtron_single_rank)
    assert imported.plan.config.family == "mamba" and imported.plan.architecture == arch
    report = verify(src, imported=imported, dtype=imported.plan.dtype_name)
    assert report.ok and report.top1_agreement >= 0.9, report
    assert imported.plan.dtype_name == kwargs.get("dtype", "float32")
    if imported.plan.dtype_name == "float32":
        assert report.max_abs_diff <= 1e-4 and report.top1_agreement == 1.0, report
    export_hf(imported.built, imported.plan.config, imported.plan.adapter, tmp_path / "out",
              source_hf_config=imported.plan.hf_config)
    assert _differences(src, tmp_path / "out") == []
    assert _config_diff(src, tmp_path / "out") == []


def test_engine_refuses_a_checkpoint_with_a_missing_tensor(tmp_path, pm) -> None:
    from safetensors.torch import save_file

    from plugtron_hf_bridge.errors import TensorSetError
    from plugtron_hf_bridge.importer import plan_import

    src = save_tiny_hf(tmp_path / "hf", "NemotronHForCausalLM")
    tensors = _tensors(src)
    del tensors["backbone.layers.1.mixer.k_proj.weight"]
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(TensorSetError, match=r"backbone\.layers\.1\.mixer\.k_proj\.weight"):
        plan_import(src, pm=pm)


def _cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "plugtron"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300)


def _report(result: subprocess.CompletedProcess) -> dict[str, Any]:
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))


def test_command_line_convert_verify_and_back(tmp_path) -> None:
    """``plugtron convert --to megatron --verify``, ``plugtron verify``, ``plugtron convert --to hf``."""
    src = save_tiny_hf(tmp_path / "hf", "Mamba2ForCausalLM", vocab=97)
    report = _report(_cli("convert", str(src), str(tmp_path / "meg"), "--to", "megatron", "--verify", "--json",
                          "--no-progress"))
    assert report["ok"] and report["max_abs_diff"] <= 1e-4
    assert json.loads((tmp_path / "meg" / "hf_bridge.json").read_text())["architecture"] == "Mamba2ForCausalLM"
    back = _cli("convert", str(tmp_path / "meg"), str(tmp_path / "out"), "--to", "hf", "--no-progress")
    assert back.returncode == 0, back.stdout + back.stderr
    assert _differences(src, tmp_path / "out") == [] and _config_diff(src, tmp_path / "out") == []
    hybrid = save_tiny_hf(tmp_path / "nemotron", "NemotronHForCausalLM")
    report = _report(_cli("verify", str(hybrid), "--json", "--seq", "19"))
    assert report["ok"] and report["max_abs_diff"] <= 1e-4
