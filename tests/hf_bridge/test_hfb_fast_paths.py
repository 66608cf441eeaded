"""The conversion's fast paths give the same answers as the slow ones, and fall back where they must.

Each fast path (issue 16) has a slower, older equivalent; these tests pin them
together: the torch-free launcher checks and the full plan, the inert and the
real ``.metadata`` reading, the shape-worked-out tensor tables and the meta-
evaluated ones, direct reads of checkpoint records and torch's reader, written
views and assembled tensors. Plus what the commands must not import.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from plugtron.sharding import unwrap
from plugtron_hf_bridge import dcp_direct, dcp_metadata
from plugtron_hf_bridge.checkpoint import bridge_meta, load_megatron, read_meta, save_megatron
from plugtron_hf_bridge.errors import CheckpointFormatError, TensorSetError
from plugtron_hf_bridge.importer import import_hf, plan_import
from plugtron_hf_bridge.preflight import preflight_import

from hfb_helpers import ARCHS, bit_exact, hf_config, make_hf, record_shard_writers, rewrite

PLUGTRON = str(Path(sys.executable).with_name("plugtron"))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return make_hf(tmp_path_factory.mktemp("pristine") / "hf", "LlamaForCausalLM", layers=2, dtype="bfloat16")


@pytest.fixture
def src(tmp_path, pristine) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "hf"))


@pytest.fixture(scope="module")
def meg(tmp_path_factory, pristine, plugtron_single_rank, pm) -> Path:
    imported = import_hf(pristine, pm=pm, parallel=plugtron_single_rank)
    plan = imported.plan
    return save_megatron(tmp_path_factory.mktemp("meg") / "meg", imported.built, plan.config,
                         meta=bridge_meta(plan.architecture, plan.hf_config, plan.config))


# -- one error for every kind of bad tensor ----------------------------------------------------------------------
def _break_three_ways(src: Path) -> None:
    def change(tensors: dict) -> None:
        tensors.pop("model.norm.weight")
        tensors["model.layers.0.mlp.extra_scale"] = torch.ones(3)
        tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(16, 64, dtype=torch.bfloat16)

    rewrite(src, change)


def test_missing_unused_and_misshaped_tensors_are_reported_together(src, pm) -> None:
    _break_three_ways(src)
    with pytest.raises(TensorSetError) as info:
        plan_import(src, pm=pm)
    text, error = str(info.value), info.value
    assert "missing (1): model.norm.weight" in text
    assert "used by no mapping (1): model.layers.0.mlp.extra_scale" in text
    assert "model.layers.1.self_attn.k_proj.weight (16, 64) != (32, 64)" in text
    assert len(error.categories) == 3 and len(error.names) == 3 and str(src) in text
    with pytest.raises(TensorSetError) as launcher:  # the launcher's torch-free checks say the same
        preflight_import(src, pm=pm)
    assert str(launcher.value) == text


def test_the_cli_prints_all_categories_on_one_line(src, tmp_path, capsys) -> None:
    from plugtron.cli import main

    _break_three_ways(src)
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "megatron", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing (1)" in err and "no mapping (1)" in err and "(16, 64)" in err


def test_a_single_category_reads_as_before(src, pm) -> None:
    rewrite(src, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(TensorSetError) as info:
        plan_import(src, pm=pm)
    assert list(info.value.categories) == ["tensors the LlamaForCausalLM table needs are missing"]


def test_combined_errors_pickle_with_their_categories() -> None:
    error = TensorSetError.combined("/ckpt", {"missing": ["a"], "unused": [], "misshaped": ["b (1,) != (2,)"]})
    again = pickle.loads(pickle.dumps(error))
    assert str(again) == str(error) and again.categories == {"missing": ["a"], "misshaped": ["b (1,) != (2,)"]}
    assert TensorSetError.combined("/ckpt", {"missing": []}) is None


# -- the launcher's checks need no torch ---------------------------------------------------------------------------
def test_launcher_checks_import_neither_torch_megatron_nor_transformers(pristine, meg) -> None:
    script = ("import sys; from plugtron_hf_bridge.preflight import preflight_export, preflight_import; "
              f"assert preflight_import({str(pristine)!r}); preflight_export({str(meg)!r}); "
              "print(sorted(m for m in ('torch', 'megatron', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_inert_metadata_reading_sees_what_the_real_one_sees(meg) -> None:
    real = dcp_metadata.read_metadata(meg / "weights")
    inert = dcp_metadata.read_metadata(meg / "weights", inert=True)
    locate = lambda m: sorted((i.fqn, s.relative_path, s.offset, s.length) for i, s in m.storage_data.items())  # noqa: E731
    assert locate(real) == locate(inert) and sorted(real.state_dict_metadata) == sorted(inert.state_dict_metadata)
    assert read_meta(meg, inert=True) == read_meta(meg)


def test_inert_reading_refuses_what_the_real_one_refuses(meg, tmp_path) -> None:
    class Payload:
        def __reduce__(self) -> tuple:
            return (os.mkdir, (str(tmp_path / "PWNED"),))

    raw = pickle.dumps(Payload())
    for inert in (False, True):
        with pytest.raises(CheckpointFormatError, match="posix.mkdir"):
            dcp_metadata.unpickle_metadata(raw, "x/.metadata", inert=inert)
    assert not (tmp_path / "PWNED").exists()


def test_the_inert_dtype_names_are_torchs() -> None:
    assert dcp_metadata.DTYPE_NAMES == dcp_metadata._dtype_names()


@pytest.mark.parametrize("arch", ARCHS)
def test_tables_work_out_the_shapes_the_transforms_produce(arch: str) -> None:
    from plugtron_gpt.hf.catalogue import mapping_for, to_megatron_fields

    cfg = hf_config(arch, tied=arch.startswith("Qwen3")).to_dict()
    cfg["architectures"] = [arch]
    for mapping in mapping_for(arch, to_megatron_fields(cfg), padded_vocab_size=128):
        inputs = [torch.empty(shape, device="meta") for shape in mapping.hf_shapes]
        assert tuple(mapping.to_megatron(inputs).shape) == mapping.megatron_shape, mapping.megatron_name


# -- progress off a terminal -----------------------------------------------------------------------------------------
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_off_a_terminal_is_a_few_plain_lines() -> None:
    from plugtron_hf_bridge.progress import progress

    stream = io.StringIO()
    assert list(progress(range(99), "import", stream=stream)) == list(range(99))
    lines = stream.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == [f"import: {n}/99 tensors" for n in (25, 50, 74, 99)]
    assert "\r" not in stream.getvalue()


def test_progress_on_a_terminal_is_a_bar() -> None:
    from plugtron_hf_bridge.progress import progress

    stream = _Terminal()
    assert list(progress(range(5), "export", stream=stream)) == list(range(5))
    assert "\r" in stream.getvalue() and "export" in stream.getvalue()


def test_the_cli_logs_plain_progress_lines(pristine, tmp_path, capsys) -> None:
    from plugtron.cli import main

    assert main(["convert", str(pristine), str(tmp_path / "out"), "--to", "megatron"]) == 0
    captured = capsys.readouterr()
    assert "import: 15/15 tensors" in captured.err and "\r" not in captured.err
    assert "converted LlamaForCausalLM" in captured.out


# -- writing views, reading records directly ------------------------------------------------------------------------
def test_written_rows_and_strided_tensors_read_back_exactly(tmp_path) -> None:
    from safetensors.torch import load_file

    from plugtron_hf_bridge.safetensors_io import SafetensorsCheckpoint, ShardedSafetensorsWriter
    from plugtron_hf_bridge.safetensors_write import Rows

    base = torch.randn(12, 6).to(torch.bfloat16)
    tensors = {"rows": Rows((base[0:2], base[6:9], base[3:4])), "strided": base.t(), "scalar": torch.tensor(2.5),
               "tied": base, "empty": torch.zeros(0, 6)}
    with ShardedSafetensorsWriter(tmp_path) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
    expected = {name: t.contiguous() for name, t in tensors.items()}
    reference = load_file(str(tmp_path / "model.safetensors"))
    with SafetensorsCheckpoint(tmp_path) as ckpt:
        for name, tensor in expected.items():
            assert torch.equal(ckpt.read(name), tensor) and torch.equal(reference[name], tensor), name


def test_export_cuts_hf_tensors_as_views_of_the_model(pristine, pm, plugtron_single_rank) -> None:
    from plugtron_hf_bridge.export_rows import hf_tensors
    from plugtron_hf_bridge.safetensors_write import Rows

    imported = import_hf(pristine, pm=pm, parallel=plugtron_single_rank)
    params = dict(unwrap(imported.built.chunks[0]).named_parameters())
    tables = {m.megatron_name: m for m in imported.plan.adapter.tensor_mappings(imported.plan.config)}
    name = "decoder.layers.0.self_attention.linear_qkv.weight"
    full = params[name].detach()
    storage = full.untyped_storage().data_ptr()
    out = dict(hf_tensors(tables[name], full))
    for tensor in out.values():
        parts = tensor.parts if isinstance(tensor, Rows) else (tensor,)
        assert all(part.untyped_storage().data_ptr() == storage for part in parts)
    assert torch.equal(out["model.layers.0.self_attn.q_proj.weight"].contiguous(),
                       tables[name].to_hf(full)[0])


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_a_single_rank_export_overlaps_writes_only_when_it_casts(pristine, pm, plugtron_single_rank, monkeypatch,
                                                                  tmp_path, dtype) -> None:
    """Uncast views at hand leave the writer thread nothing to overlap (shards written by the caller);
    a cast export produces new tensors while a shard is written. Either way the checkpoint is the same."""
    import threading

    from plugtron_hf_bridge.exporter import export_hf
    from plugtron_hf_bridge.safetensors_io import SafetensorsCheckpoint

    threads = record_shard_writers(monkeypatch)
    imported = import_hf(pristine, pm=pm, parallel=plugtron_single_rank)
    plan = imported.plan
    out = export_hf(imported.built, plan.config, plan.adapter, tmp_path / "out", source_hf_config=plan.hf_config,
                    dtype=dtype, max_shard_bytes=40_000)
    caller = threading.current_thread().name
    assert len(threads) >= 3
    assert all((name != caller) == (dtype is not None) for name in threads[:-1]), threads
    with SafetensorsCheckpoint(pristine) as source, SafetensorsCheckpoint(out) as written:
        for name in source.names():
            expected = source.read(name)
            assert torch.equal(written.read(name), expected if dtype is None else expected.float()), name


def test_direct_reads_equal_torchs_reader(meg, pm, plugtron_single_rank, monkeypatch) -> None:
    direct = load_megatron(meg, pm=pm, parallel=plugtron_single_rank)
    monkeypatch.setattr(dcp_direct.Layouts, "get", lambda *args: None)  # every record through torch.load
    slow = load_megatron(meg, pm=pm, parallel=plugtron_single_rank)
    left, right = (unwrap(m.built.chunks[0]).state_dict() for m in (direct, slow))
    assert all(torch.equal(left[k], right[k]) for k in left if isinstance(left[k], torch.Tensor))


def _record(tensor: torch.Tensor) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    return buffer


@pytest.mark.parametrize("make", [
    lambda: torch.arange(12.0).reshape(3, 4).t(),  # stored with its transposed strides
    lambda: torch.arange(12.0)[2:],  # a view: torch.save keeps the whole storage and an offset
    lambda: {"a": torch.zeros(2)},  # not a tensor
], ids=["strided", "offset", "dict"])
def test_records_that_are_not_the_plain_kind_are_left_to_torch(make) -> None:
    buffer = _record(make())
    assert dcp_direct.layout(buffer, 0, len(buffer.getvalue())) is None


def _records(*tensors: torch.Tensor, crc32: bool = False) -> tuple[io.BytesIO, list[tuple[int, int]]]:
    """One file of ``torch.save`` records back to back, as a ``.distcp`` holds them; (offset, length) of each.

    Without zip CRCs (how plugtron's writer saves) a record's bytes around its data depend on its dtype and
    shape only; with them (torch's default, megatron's own writer) they also carry the data's checksum.
    """
    out, spans = io.BytesIO(), []
    saved = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(crc32)
    try:
        for tensor in tensors:
            record = _record(tensor).getvalue()
            spans.append((out.tell(), len(record)))
            out.write(record)
    finally:
        torch.serialization.set_crc32_options(saved)
    return out, spans


def _counting_parses(monkeypatch) -> list[int]:
    parses: list[int] = []
    real = dcp_direct._layout
    monkeypatch.setattr(dcp_direct, "_layout", lambda window: parses.append(window.offset) or real(window))
    return parses


def test_records_of_one_kind_are_parsed_once_and_found_where_a_parse_finds_them(monkeypatch) -> None:
    tensors = [torch.randn(8, 16) for _ in range(3)] + [torch.randn(4, 32), torch.randn(8, 16, dtype=torch.bfloat16)]
    file, spans = _records(*tensors)
    expected = [dcp_direct.layout(file, offset, length) for offset, length in spans]
    parses = _counting_parses(monkeypatch)
    frames = dcp_direct.Layouts()
    found = [frames.get(file, offset, length) for offset, length in spans]
    assert found == expected and None not in found
    assert parses == [spans[0][0], spans[3][0], spans[4][0]]  # the 2nd and 3rd (8, 16) float32 records reuse the 1st
    for layout, tensor in zip(found, tensors):
        out = torch.empty_like(tensor)
        assert dcp_direct.read_into(file, layout, (0, 0), tuple(tensor.shape), out) and torch.equal(out, tensor)


def test_records_whose_frames_differ_are_each_parsed(monkeypatch) -> None:
    file, spans = _records(torch.randn(8, 16), torch.randn(8, 16), crc32=True)  # checksums differ: frames differ
    expected = [dcp_direct.layout(file, offset, length) for offset, length in spans]
    parses = _counting_parses(monkeypatch)
    frames = dcp_direct.Layouts()
    assert [frames.get(file, offset, length) for offset, length in spans] == expected
    assert parses == [offset for offset, _ in spans]


def test_a_frame_whose_parse_read_its_data_is_never_reused() -> None:
    file, spans = _records(torch.randn(8, 16))
    frames = dcp_direct.Layouts()
    window = dcp_direct._Window(file, *spans[0])
    found = dcp_direct._layout(window)
    start = found.start - spans[0][0]
    assert all(stop <= start or begin >= start + 8 * 16 * 4 for begin, stop in window.spans)  # torch's kind: clean
    real = dcp_direct._layout

    def reads_data_too(window):  # as a crafted archive whose directory points into the data would
        result = real(window)
        window.seek(start)
        window.read(4)
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dcp_direct, "_layout", reads_data_too)
        assert frames.get(file, *spans[0]) == found
    assert frames._frames[spans[0][1]] == []  # nothing kept: the next such record is parsed again


def test_a_plain_record_is_found_and_read_by_rows() -> None:
    tensor = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    buffer = _record(tensor)
    found = dcp_direct.layout(buffer, 0, len(buffer.getvalue()))
    assert found is not None and found.shape == (4, 6) and found.dtype == "float32"
    out = torch.empty(2, 6)
    assert dcp_direct.read_into(buffer, found, (1, 0), (2, 6), out) and torch.equal(out, tensor[1:3])
    columns = torch.empty(4, 3)  # a column slice: row blocks through a staging buffer, or torch's path without one
    assert not dcp_direct.read_into(buffer, found, (0, 2), (4, 3), columns)
    assert dcp_direct.read_into(buffer, found, (0, 2), (4, 3), columns, dcp_direct.Staging())
    assert torch.equal(columns, tensor[:, 2:5])
    stacked = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)  # megatron's per-layer [1, rows, cols] kind
    buffer = _record(stacked)
    found = dcp_direct.layout(buffer, 0, len(buffer.getvalue()))
    block = torch.empty(1, 3, 2)
    assert dcp_direct.read_into(buffer, found, (1, 0, 2), (1, 3, 2), block, dcp_direct.Staging())
    assert torch.equal(block, stacked[1:2, :, 2:4])
    assert not dcp_direct.read_into(buffer, found, (0, 0, 0), (2, 2, 4), torch.empty(2, 2, 4))  # rows of two layers


def test_megatrons_own_loader_reads_what_plugtron_writes(meg, pm, plugtron_single_rank) -> None:
    """The records are written without zip CRCs (dcp_strategies._without_crc32): megatron's default
    torch_dist strategies, what megatron-LM loads with, read them all the same."""
    from megatron.core import dist_checkpointing

    loaded = load_megatron(meg, pm=pm, parallel=plugtron_single_rank)
    inner = unwrap(loaded.built.chunks[0])
    expected = {k: v.clone() for k, v in inner.state_dict().items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        for param in inner.parameters():
            param.zero_()
    state = dist_checkpointing.load({"chunk": inner.sharded_state_dict()}, str(meg / "weights"))
    inner.load_state_dict(state["chunk"], strict=True)
    assert all(torch.equal(v, expected[k]) for k, v in inner.state_dict().items() if k in expected)


# -- what the commands import ------------------------------------------------------------------------------------------
def test_convert_imports_neither_transformers_nor_torchs_compiler(pristine, tmp_path) -> None:
    done = subprocess.run([sys.executable, "-X", "importtime", PLUGTRON, "convert", str(pristine), str(tmp_path / "meg"),
                           "--to", "megatron", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "megatron.core" in imported
    assert not {m for m in imported if m.split(".")[0] == "transformers" or m.startswith(("torch._dynamo", "torch._inductor"))}
    back = subprocess.run([PLUGTRON, "convert", str(tmp_path / "meg"), str(tmp_path / "hf"), "--to", "hf", "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert back.returncode == 0, back.stderr[-3000:]
    assert bit_exact(pristine, tmp_path / "hf") == []


def test_compile_is_deferred_to_the_first_call() -> None:
    from plugtron_hf_bridge.libraries import compile_on_first_call

    calls = []

    def fake_compile(fn: Any, **options: Any) -> Any:
        calls.append(options)
        return lambda *a: fn(*a) * 10

    deferred = compile_on_first_call(fake_compile)
    double = deferred(lambda x: 2 * x)
    triple = deferred(mode="max-autotune")(lambda x: 3 * x)
    assert calls == []
    assert double(1) == 20 and double(2) == 40 and triple(1) == 30
    assert calls == [{}, {"mode": "max-autotune"}]


def test_only_command_processes_are_frozen(monkeypatch) -> None:
    import gc

    import plugtron.cli
    from plugtron_hf_bridge.libraries import settle

    frozen = []
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(True))
    settle()
    assert not plugtron.cli.is_command_process() and frozen == []  # this test session calls plugtron.cli.main
    monkeypatch.setattr(plugtron.cli, "_command_process", True)  # what plugtron.cli.run sets
    settle()
    assert frozen == [True]
