"""Quantised checkpoints: FP8 block-scaled weights dequantised on import, per rank; MXFP4.

transformers 5.23 cannot load an FP8 checkpoint here (its FP8 quantizer needs ``accelerate``,
which is not installed, and its CPU dequantiser divides the weight by the scale grid, so it
refuses weights whose sides are not multiples of the block). So the reference is built by the
test: a random float Llama is quantised per 128 x 128 block by the test itself (sides of 80,
160 and 300: partial blocks), and a plain checkpoint of the dequantised values
(``weight.float() * scale_inv``) is the truth. The FP8 import must equal it bit for bit (at
TP=1 here, at TP=2 in the one two-rank launch), and ``verify`` against transformers on that
checkpoint holds. The architecture is Llama with ``quantization_config`` accepted through
:func:`plugtron_hf_bridge.quantization.accept`, registered by this module as a test plugin
(``Fp8LlamaForCausalLM``), as DeepSeek-V3 accepts it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from hfb_helpers import bit_exact, read_all

ARCH = "Fp8LlamaForCausalLM"
BLOCK = (128, 128)
QCONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(BLOCK)}


# -- the test architecture (a plugin, so the engine finds it like any other) ---------------------------
def _read(k: Any) -> dict[str, Any]:
    from plugtron_gpt.hf.llama import LLAMA
    from plugtron_hf_bridge import quantization

    quantization.accept(k, (quantization.FP8,))
    return LLAMA.read(k)


def _adapter() -> Any:
    from plugtron_gpt.hf.adapter import GPTAdapter
    from plugtron_gpt.hf.llama import LLAMA

    return GPTAdapter(LLAMA.derive(name=ARCH, read=_read, model_class="transformers:LlamaForCausalLM"))


def __getattr__(name: str) -> Any:  # ADAPTER built on first use: collecting this file imports no family
    if name == "ADAPTER":
        globals()["ADAPTER"] = adapter = _adapter()
        return adapter
    raise AttributeError(name)


class Plugin:
    @staticmethod
    def plugtron_register_converters() -> list[Any]:
        from plugtron import ConverterInfo

        return [ConverterInfo(source_format="hf", architecture=ARCH, family="gpt",
                              adapter="test_quantized_import:ADAPTER", description="test: Llama with FP8 weights")]


def manager() -> Any:
    from plugtron import PlugtronPluginManager

    pm = PlugtronPluginManager()
    pm.register(Plugin(), name="fp8-llama-test")
    return pm


# -- checkpoints -----------------------------------------------------------------------------------------
def quantize(weight: Any, block: tuple[int, int] = BLOCK) -> tuple[Any, Any]:
    """(float8_e4m3fn weight, float32 scale_inv) per block: scale = amax / 448, as DeepSeek's tools do."""
    import torch

    rows, cols = weight.shape
    grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scale = torch.empty(grid, dtype=torch.float32)
    for i in range(grid[0]):
        for j in range(grid[1]):
            r, c = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            s = weight[r, c].float().abs().max().clamp(min=1e-12) / 448.0
            q[r, c] = (weight[r, c].float() / s).to(torch.float8_e4m3fn)
            scale[i, j] = s
    return q, scale


def dequantized(q: Any, scale: Any, block: tuple[int, int] = BLOCK) -> Any:
    """The truth, element by element: weight.float() * its block's scale_inv."""
    full = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return q.float() * full[: q.shape[0], : q.shape[1]]


def make_checkpoints(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """(FP8 checkpoint, plain float32 checkpoint of its dequantised values)."""
    import torch
    import transformers
    from safetensors.torch import save_file

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=160, intermediate_size=300, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    ref, fp8 = root / "reference", root / "fp8"
    model.save_pretrained(ref)
    tensors = read_all(ref)
    quantized: dict[str, Any] = {}
    for name, t in tensors.items():
        if name.endswith("_proj.weight"):  # the linears; embeddings, norms and the head stay float (as DeepSeek-V3)
            q, s = quantize(t)
            quantized[name], quantized[name + "_scale_inv"] = q, s
            tensors[name] = dequantized(q, s)
        else:
            quantized[name] = t
    save_file(tensors, str(ref / "model.safetensors"), metadata={"format": "pt"})
    fp8.mkdir()
    save_file(quantized, str(fp8 / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((ref / "config.json").read_text())
    cfg.update(architectures=[ARCH], quantization_config=QCONFIG)
    (fp8 / "config.json").write_text(json.dumps(cfg))
    return fp8, ref


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> tuple[Path, Path]:
    return make_checkpoints(tmp_path_factory.mktemp("fp8"))


# -- TP=1 in process -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", None])
def test_fp8_import_equals_the_dequantised_values_bit_for_bit(tmp_path, ckpts, plugtron_single_rank, dtype) -> None:
    """Every weight equals ``weight.float() * scale_inv`` cast to the model dtype (bfloat16 unless told),
    exactly: the export of the imported model is the dequantised checkpoint, bit for bit."""
    import torch
    from plugtron_hf_bridge.exporter import export_hf
    from plugtron_hf_bridge.importer import import_hf
    from plugtron_hf_bridge.verify import verify

    fp8, ref = ckpts
    imported = import_hf(fp8, dtype=dtype, pm=manager(), parallel=plugtron_single_rank)
    assert imported.plan.dtype_name == (dtype or "bfloat16")
    assert imported.plan.unused == []  # the scales are companions, not unused tensors
    params = dict(imported.built.chunks[0].named_parameters())
    assert not any("scale" in n for n in params)
    export_hf(imported.built, imported.plan.config, imported.plan.adapter, tmp_path / "out",
              source_hf_config=imported.plan.hf_config)
    out = read_all(tmp_path / "out")
    assert not any(n.endswith("_scale_inv") for n in out)  # never loaded (nor written) as weights
    want = {n: t.to(getattr(torch, dtype or "bfloat16")) for n, t in read_all(ref).items()}
    assert sorted(out) == sorted(want)
    assert [n for n in out if not torch.equal(out[n], want[n])] == []
    if dtype == "float32":
        assert bit_exact(ref, tmp_path / "out") == []
        report = verify(ref, imported=imported)  # against transformers on the dequantised checkpoint
        assert report.max_abs_diff <= 1e-4 and report.top1_agreement == 1.0, report
        report = verify(fp8, imported=imported)  # the FP8 source itself: verify dequantises its reference
        assert report.max_abs_diff <= 1e-4 and report.top1_agreement == 1.0, report


def test_a_dequantised_copy_is_the_reference(tmp_path, ckpts) -> None:
    """``quantization.write_dequantized``: the plain checkpoint transformers can load for a logit reference."""
    from plugtron_hf_bridge.quantization import write_dequantized

    fp8, ref = ckpts
    out = write_dequantized(fp8, tmp_path / "plain")
    assert bit_exact(ref, out) == []
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_the_export_of_a_dequantised_model_does_not_claim_fp8(tmp_path, ckpts, plugtron_single_rank) -> None:
    from plugtron_hf_bridge.exporter import export_hf
    from plugtron_hf_bridge.importer import import_hf

    imported = import_hf(ckpts[0], pm=manager(), parallel=plugtron_single_rank)
    export_hf(imported.built, imported.plan.config, imported.plan.adapter, tmp_path / "out",
              source_hf_config=imported.plan.hf_config)
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())


def test_each_rank_reads_only_its_rows_and_their_scale_rows(ckpts) -> None:
    """A region of rows r0..r1 reads those fp8 rows and scale rows r0 // 128 .. ceil(r1 / 128), nothing more
    (whole rows, as every region read: a column slice is cut from them)."""
    import torch
    from plugtron_hf_bridge import quantization
    from plugtron_hf_bridge.safetensors_io import SafetensorsCheckpoint

    fp8, _ = ckpts
    name = "model.layers.0.mlp.gate_proj.weight"  # [300, 160]: 3 x 2 blocks, the last ones partial
    with SafetensorsCheckpoint(fp8) as ckpt:
        q, s = ckpt.read(name), ckpt.read(name + "_scale_inv")
        truth = dequantized(q, s)
        reader = quantization.reader(ckpt, quantization.Scheme("fp8", BLOCK))
        for rows, cols in [((150, 300), None), ((0, 150), None), ((100, 260), (60, 160)), ((127, 129), (0, 1))]:
            before = reader.bytes_read
            out = torch.empty(rows[1] - rows[0], (cols or (0, 160))[1] - (cols or (0, 160))[0])
            reader.read_into(name, out, rows, cols)
            c = cols or (0, 160)
            assert torch.equal(out, truth[rows[0]:rows[1], c[0]:c[1]])
            scale_rows = math.ceil(rows[1] / 128) - rows[0] // 128
            assert reader.bytes_read - before == (rows[1] - rows[0]) * 160 + 4 * scale_rows * 2
        small = quantization.reader(ckpt, quantization.Scheme("fp8", BLOCK))
        small.chunk_bytes = 1  # one band of 128 rows at a time
        out = torch.empty(160, 300)
        small.read_into(name, out, (0, 300), transpose=True)
        assert torch.equal(out, truth.t())
        reader.close(), small.close()


# -- refusals --------------------------------------------------------------------------------------------
def _edit(fp8: Path, tmp: Path, change: Any = None, config: Any = None) -> Path:
    import shutil

    from safetensors.torch import save_file

    bad = tmp / "bad"
    shutil.copytree(fp8, bad)
    if change is not None:
        tensors = read_all(fp8)
        change(tensors)
        save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        cfg = json.loads((bad / "config.json").read_text())
        config(cfg)
        (bad / "config.json").write_text(json.dumps(cfg))
    return bad


def _plan_error(src: Path, dtype: str | None = None) -> Exception:
    """The error of the plan, which the launcher's torch-free check raises alike."""
    from plugtron.errors import PlugtronError
    from plugtron_hf_bridge.importer import plan_import
    from plugtron_hf_bridge.preflight import preflight_import

    errors = []
    for check in (plan_import, preflight_import):
        with pytest.raises(PlugtronError) as info:
            check(src, pm=manager(), dtype=dtype)
        errors.append(info.value)
    assert type(errors[0]) is type(errors[1]) and str(errors[0]) == str(errors[1])
    return errors[0]


def test_a_bad_scale_shape_is_refused_by_tensor_name(ckpts, tmp_path) -> None:
    import torch

    name = "model.layers.1.self_attn.k_proj.weight_scale_inv"  # [1, 2] for a [80, 160] weight
    bad = _edit(ckpts[0], tmp_path, lambda t: t.__setitem__(name, torch.ones(2, 2)))
    assert f"{name} (2, 2) != (1, 2)" in str(_plan_error(bad))


def test_a_missing_scale_and_a_scale_of_a_float_weight_are_refused_by_name(ckpts, tmp_path) -> None:
    def change(t: dict[str, Any]) -> None:
        del t["model.layers.0.mlp.up_proj.weight_scale_inv"]
        t["model.layers.0.mlp.down_proj.weight"] = t["model.layers.0.mlp.down_proj.weight"].float()

    message = str(_plan_error(_edit(ckpts[0], tmp_path, change)))
    up, down = "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"
    assert f"{up} is float8_e4m3fn but {up}_scale_inv is missing" in message
    assert f"{down}_scale_inv scales {down}, which is stored as float32" in message


def test_float8_weights_without_a_quantization_config_are_refused(ckpts, tmp_path) -> None:
    def plain_llama(c: dict[str, Any]) -> None:
        c.pop("quantization_config")
        c.update(architectures=["LlamaForCausalLM"])

    bad = _edit(ckpts[0], tmp_path, config=plain_llama)
    assert "float8_e4m3fn without a quantization_config" in str(_plan_error(bad))
    message = str(_plan_error(bad, "bfloat16"))  # with a dtype given, each float8 weight is named
    q = "model.layers.0.self_attn.q_proj.weight"
    assert f"{q} is stored as float8_e4m3fn (config.json has no quantization_config)" in message


@pytest.mark.parametrize("key,value,field", [
    ("weight_block_size", None, "quantization_config.weight_block_size"),
    ("activation_scheme", "static", "quantization_config.activation_scheme"),
    ("fmt", "e5m2", "quantization_config.fmt"),
    ("quant_method", "mxfp4", "quantization_config.quant_method"),
    ("quant_method", "bitsandbytes", "quantization_config.quant_method"),
    ("kv_cache_scheme", "fp8", "quantization_config.kv_cache_scheme"),
])
def test_quantization_settings_the_engine_cannot_read_are_refused_by_name(ckpts, tmp_path, key, value, field) -> None:
    from plugtron.conversion import UnsupportedConfigError

    bad = _edit(ckpts[0], tmp_path, config=lambda c: c["quantization_config"].__setitem__(key, value))
    error = _plan_error(bad)
    assert isinstance(error, UnsupportedConfigError) and error.field == field and repr(value) in str(error)


def test_an_architecture_that_does_not_accept_quantization_refuses_the_key(ckpts, tmp_path) -> None:
    """Plain Llama never ships quantised: its reader does not accept the key."""
    from plugtron.conversion import UnsupportedConfigError

    bad = _edit(ckpts[0], tmp_path, config=lambda c: c.update(architectures=["LlamaForCausalLM"]))
    error = _plan_error(bad)
    assert isinstance(error, UnsupportedConfigError) and error.field == "quantization_config"


# -- MXFP4 -----------------------------------------------------------------------------------------------
def test_mxfp4_dequantisation_matches_transformers() -> None:
    """The arithmetic equals transformers' own gpt-oss MXFP4 unpacking, bit for bit."""
    import torch
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from plugtron_hf_bridge.quantization import dequantize_mxfp4

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 6, 2, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(120, 134, (3, 6, 2), dtype=torch.uint8, generator=g)
    ours = dequantize_mxfp4(blocks, scales)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, cols, rows]: transposed
    assert torch.equal(ours.transpose(1, 2), theirs)


def test_mxfp4_tensors_are_refused_by_name(ckpts, tmp_path) -> None:
    import torch

    def change(t: dict[str, Any]) -> None:
        t["model.layers.0.mlp.experts.gate_up_proj_blocks"] = torch.zeros(2, 4, 1, 16, dtype=torch.uint8)
        t["model.layers.0.mlp.experts.gate_up_proj_scales"] = torch.zeros(2, 4, 1, dtype=torch.uint8)

    message = str(_plan_error(_edit(ckpts[0], tmp_path, change)))
    assert "model.layers.0.mlp.experts.gate_up_proj_blocks (MXFP4 blocks)" in message


# -- TP=2: one two-rank launch ---------------------------------------------------------------------------
@pytest.mark.multiprocess
def test_fp8_import_at_tp2_equals_the_dequantised_values(ckpts, tmp_path) -> None:
    """Each rank dequantises its own rows (column-parallel) or columns (row-parallel) with the scale
    rows/columns covering them; the TP=2 model exports to the dequantised checkpoint bit for bit."""
    fp8, ref = ckpts
    scenarios = [{"name": "fp8 tp2", "kind": "quant", "src": str(fp8), "reference": str(ref), "tp": 2}]
    from hfb_helpers import run_scenarios

    r = run_scenarios(scenarios, tmp_path / "out")[0][0]
    assert r["mismatched"] == [] and r["scales_loaded"] == [], r
    assert r["diff"] <= 1e-4 and r["top1"] == 1.0, r
    assert all(b < r["checkpoint_bytes"] for b in r["bytes"]), r  # each rank read only its share
