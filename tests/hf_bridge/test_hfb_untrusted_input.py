"""HF checkpoints from strangers: every unsafe or inconsistent input is refused by name, before any write.

One test (or group) per hardening point: safetensors byte layout and duplicate
names, tensor dtypes, side files and links (with the hub cache's legitimate
blob links), the error types, and real published configs.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch

from plugtron.cli import main
from plugtron.untrusted import UntrustedFileError, regular_file_inside
from plugtron_gpt.hf.catalogue import to_megatron_fields
from plugtron_hf_bridge.errors import CheckpointFormatError, ConversionError, TensorSetError, UnsupportedConfigError
from plugtron_hf_bridge.hf_config import read_hf_config
from plugtron_hf_bridge.importer import plan_import
from plugtron_hf_bridge.safetensors_io import INDEX_FILE, SINGLE_FILE, SafetensorsCheckpoint, read_header

from hfb_helpers import make_hf, rewrite


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return make_hf(tmp_path_factory.mktemp("pristine") / "hf", "LlamaForCausalLM", layers=1, tokenizer=True)


@pytest.fixture
def src(tmp_path, pristine) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "hf"))


def write_raw(path: Path, header: dict | bytes, data_bytes: int) -> Path:
    """A safetensors file from a hand-written header (dict or exact JSON bytes) and zeroed data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data_bytes))
    return path


def f32(begin: int, end: int) -> dict:
    return {"dtype": "F32", "shape": [(end - begin) // 4], "data_offsets": [begin, end]}


def refuse_by_cli(capsys, src: Path, dst: Path, *needles: str) -> str:
    """``plugtron convert`` fails with one line naming every needle, and writes nothing at all."""
    before = sorted(p.name for p in dst.parent.iterdir())
    code = main(["convert", str(src), str(dst), "--to", "megatron", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("plugtron: error: ") and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not dst.exists() and sorted(p.name for p in dst.parent.iterdir()) == before
    return err


# -- 1. safetensors headers --------------------------------------------------------------------------
def test_overlapping_tensors_are_refused_naming_file_and_both_tensors(tmp_path) -> None:
    path = write_raw(tmp_path / SINGLE_FILE, {"a": f32(0, 8), "b": f32(4, 12)}, 12)
    with pytest.raises(CheckpointFormatError, match="overlaps") as info:
        read_header(path)
    assert str(path) in str(info.value) and "'a'" in str(info.value) and "'b'" in str(info.value)


@pytest.mark.parametrize("header,data,culprit", [
    ({"a": f32(4, 12)}, 12, "'a' starts at byte 4"),                     # gap before the first tensor
    ({"a": f32(0, 4), "c": f32(8, 12)}, 12, "'c' starts at byte 8"),    # gap between tensors
    ({"a": f32(0, 8)}, 12, "4 bytes after the last tensor ('a')"),       # trailing bytes
    ({"a": f32(0, 8), "b": f32(0, 8)}, 8, "'b'"),                       # one byte range, two names
    ({"a": f32(0, 8), "e": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]}}, 8, "'e'"),  # empty inside 'a'
])
def test_offsets_must_tile_the_data_section(tmp_path, header, data, culprit) -> None:
    path = write_raw(tmp_path / SINGLE_FILE, header, data)
    with pytest.raises(CheckpointFormatError) as info:
        read_header(path)
    assert str(path) in str(info.value) and culprit in str(info.value)


LAYOUTS = {
    "exact": ({"a": f32(0, 8)}, 8),
    "trailing": ({"a": f32(0, 8)}, 12),
    "gap": ({"a": f32(0, 4), "c": f32(8, 12)}, 12),
    "overlap": ({"a": f32(0, 8), "b": f32(4, 12)}, 12),
    "empty first": ({"a": f32(0, 8), "e": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}, 8),
    "empty between": ({"a": f32(0, 4), "c": f32(4, 8), "e": {"dtype": "F32", "shape": [2, 0], "data_offsets": [4, 4]}}, 8),
    "empty last": ({"a": f32(0, 8), "e": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]}}, 8),
    "empty inside": ({"a": f32(0, 8), "e": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]}}, 8),
    "only empty": ({"e": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}, 0),
    "no tensors": ({}, 0),
    "no tensors, trailing": ({}, 4),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_rules_match_the_safetensors_library(tmp_path, layout) -> None:
    """Trailing bytes and zero-size tensors: accept exactly what the reference reader accepts."""
    from safetensors import safe_open

    path = write_raw(tmp_path / SINGLE_FILE, *LAYOUTS[layout])
    try:
        with safe_open(str(path), framework="pt") as handle:
            [handle.get_tensor(k) for k in handle.keys()]
        library_ok = True
    except Exception:  # safetensors raises its own error type
        library_ok = False
    try:
        read_header(path)
        ours_ok = True
    except CheckpointFormatError:
        ours_ok = False
    assert ours_ok == library_ok, layout


def test_tensor_listed_twice_in_a_header_is_refused(tmp_path) -> None:
    raw = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'
    path = write_raw(tmp_path / SINGLE_FILE, raw, 8)
    with pytest.raises(CheckpointFormatError, match="lists 'w' twice") as info:
        SafetensorsCheckpoint(tmp_path)
    assert str(path) in str(info.value)


def test_shard_index_is_read_strictly(tmp_path) -> None:
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "s1.safetensors"))
    save_file({"b": torch.zeros(2)}, str(tmp_path / "s2.safetensors"))
    index = tmp_path / INDEX_FILE
    index.write_text('{"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors", "a": "s2.safetensors"}}')
    with pytest.raises(CheckpointFormatError, match="'a' appears twice") as info:
        SafetensorsCheckpoint(tmp_path)
    assert str(index) in str(info.value)
    index.unlink()
    with open(index, "wb") as handle:  # sparse: costs no disk space
        handle.truncate(65 * 2**20)
    with pytest.raises(CheckpointFormatError, match="limit") as info:
        SafetensorsCheckpoint(tmp_path)
    assert str(index) in str(info.value)


# -- 2. dtypes -----------------------------------------------------------------------------------------
def test_integer_tensor_where_a_float_weight_belongs_is_refused_naming_all(src) -> None:
    bad = ["model.layers.0.mlp.up_proj.weight", "model.norm.weight"]
    rewrite(src, lambda t: t.update({n: t[n].view(torch.int32) for n in bad}))  # same bytes, same shape
    with pytest.raises(TensorSetError) as info:
        plan_import(src)
    text = str(info.value)
    assert len(info.value.names) == 2, text
    for name in bad:
        assert f"{name} in {SINGLE_FILE} is stored as int32 (the model holds it as float32)" in text, text
    assert str(src) in text


# -- 3. side files and links ---------------------------------------------------------------------------
def test_config_json_linked_to_a_device_is_refused_before_reading(capsys, src, tmp_path) -> None:
    (src / "config.json").unlink()
    (src / "config.json").symlink_to("/dev/zero")
    refuse_by_cli(capsys, src, tmp_path / "out", str(src / "config.json"), "refusing to follow it")


def test_huge_config_json_is_refused_before_reading(src) -> None:
    with open(src / "config.json", "r+b") as handle:  # sparse: costs no disk space
        handle.truncate(64 * 2**20)
    with pytest.raises(CheckpointFormatError, match="limit") as info:
        plan_import(src)
    assert info.value.path == src / "config.json"


def test_tokenizer_file_linking_out_is_refused_and_nothing_is_written(capsys, src, tmp_path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the output")
    (src / "tokenizer.json").symlink_to(secret)
    err = refuse_by_cli(capsys, src, tmp_path / "out", str(src / "tokenizer.json"), "outside")
    assert "not for the output" not in err


def test_shard_linking_out_of_the_directory_is_refused(tmp_path) -> None:
    from safetensors.torch import save_file

    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    src.mkdir(), elsewhere.mkdir()
    save_file({"a": torch.zeros(2)}, str(src / "s1.safetensors"))
    save_file({"b": torch.zeros(2)}, str(elsewhere / "s2.safetensors"))
    (src / "s2.safetensors").symlink_to(elsewhere / "s2.safetensors")
    (src / INDEX_FILE).write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    with pytest.raises(CheckpointFormatError, match="outside") as info:
        SafetensorsCheckpoint(src)
    assert info.value.path == src / "s2.safetensors"
    (src / INDEX_FILE).unlink()
    (src / SINGLE_FILE).symlink_to(elsewhere / "s2.safetensors")
    with pytest.raises(CheckpointFormatError, match="outside"):
        SafetensorsCheckpoint(src)


def hub_snapshot(cache: Path, source: Path, repo: str = "models--org--tiny") -> Path:
    """``source`` laid out like the hub cache: every file a link ``snapshots/REV/f -> ../../blobs/HASH``."""
    snapshot, blobs = cache / repo / "snapshots" / "0123abc", cache / repo / "blobs"
    snapshot.mkdir(parents=True), blobs.mkdir()
    for i, file in enumerate(sorted(source.iterdir())):
        shutil.copy(file, blobs / f"blob{i}")
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", f"blob{i}"))
    return snapshot


def test_hub_cache_snapshot_links_into_its_own_blobs_are_accepted(src, tmp_path) -> None:
    snapshot = hub_snapshot(tmp_path / "hub", src)
    plan = plan_import(snapshot)
    assert "tokenizer_config.json" in plan.tokenizer_files and plan.tokenizer_files == plan_import(src).tokenizer_files
    nested = snapshot / "sub"  # files in a snapshot subfolder link one level further up
    nested.mkdir()
    (nested / "t.json").symlink_to(Path("..", "..", "..", "blobs", "blob0"))
    assert regular_file_inside(nested, "t.json") == nested / "t.json"


@pytest.mark.parametrize("target", [
    Path("..", "..", "..", "models--other--repo", "blobs", "b"),  # another repository's blob
    Path("..", "..", "refs", "main"),                             # inside the repo, but not a blob
    Path("..", "..", "blobs", "sub", "b"),                        # not directly in blobs
])
def test_other_links_out_of_a_hub_snapshot_are_refused(tmp_path, target) -> None:
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "rev"
    snapshot.mkdir(parents=True)
    for folder in (repo / "blobs" / "sub", repo / "refs", tmp_path / "hub" / "models--other--repo" / "blobs"):
        folder.mkdir(parents=True, exist_ok=True)
    for file in (repo / "blobs" / "sub" / "b", repo / "refs" / "main", tmp_path / "hub" / "models--other--repo" / "blobs" / "b"):
        file.write_text("{}")
    (snapshot / "tokenizer.json").symlink_to(target)
    with pytest.raises(UntrustedFileError, match="outside"):
        regular_file_inside(snapshot, "tokenizer.json")


def test_blob_links_outside_a_hub_layout_are_refused(tmp_path) -> None:
    """The exception needs the whole layout: ``snapshots`` inside a ``models--`` folder."""
    for repo in ("not-a-hub-repo", "models--org--tiny"):
        snapshot = tmp_path / repo / ("snaps" if repo.startswith("models") else "snapshots") / "rev"
        (tmp_path / repo / "blobs").mkdir(parents=True)
        snapshot.mkdir(parents=True)
        (tmp_path / repo / "blobs" / "b").write_text("{}")
        (snapshot / "config.json").symlink_to(Path("..", "..", "blobs", "b"))
        with pytest.raises(UntrustedFileError, match="outside"):
            regular_file_inside(snapshot, "config.json")


# -- 4. one except clause ------------------------------------------------------------------------------
def test_bridge_file_errors_are_untrusted_file_errors_naming_the_file(src) -> None:
    assert issubclass(CheckpointFormatError, UntrustedFileError) and issubclass(CheckpointFormatError, ConversionError)
    (src / "config.json").unlink()
    (src / "config.json").symlink_to("/dev/zero")
    with pytest.raises(UntrustedFileError) as info:
        plan_import(src)
    assert isinstance(info.value, CheckpointFormatError)  # still the bridge's own type
    assert info.value.path == src / "config.json" and str(src / "config.json") in str(info.value)
    err = CheckpointFormatError("some/file", "broken")
    assert (err.path, err.problem, str(err)) == (Path("some/file"), "broken", "some/file: broken")


# -- 5. real published configs -------------------------------------------------------------------------
#: Qwen/Qwen2.5-0.5B-Instruct config.json as published on the hub.
QWEN25_05B_INSTRUCT = """{
  "architectures": [
    "Qwen2ForCausalLM"
  ],
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "eos_token_id": 151645,
  "hidden_act": "silu",
  "hidden_size": 896,
  "initializer_range": 0.02,
  "intermediate_size": 4864,
  "max_position_embeddings": 32768,
  "max_window_layers": 21,
  "model_type": "qwen2",
  "num_attention_heads": 14,
  "num_hidden_layers": 24,
  "num_key_value_heads": 2,
  "rms_norm_eps": 1e-06,
  "rope_theta": 1000000.0,
  "sliding_window": 32768,
  "tie_word_embeddings": true,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.43.1",
  "use_cache": true,
  "use_sliding_window": false,
  "vocab_size": 151936
}
"""
#: Qwen/Qwen2.5-0.5B (base) config.json as published: it carries "use_mrope": false.
QWEN25_05B = """{
  "architectures": [
    "Qwen2ForCausalLM"
  ],
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "eos_token_id": 151643,
  "hidden_act": "silu",
  "hidden_size": 896,
  "initializer_range": 0.02,
  "intermediate_size": 4864,
  "max_position_embeddings": 32768,
  "max_window_layers": 24,
  "model_type": "qwen2",
  "num_attention_heads": 14,
  "num_hidden_layers": 24,
  "num_key_value_heads": 2,
  "rms_norm_eps": 1e-06,
  "rope_theta": 1000000.0,
  "sliding_window": 32768,
  "tie_word_embeddings": true,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.40.1",
  "use_cache": true,
  "use_mrope": false,
  "use_sliding_window": false,
  "vocab_size": 151936
}
"""
#: A nanotron-exported Llama config with the keys HuggingFaceTB/SmolLM2-135M publishes
#: (``is_llama_config``, ``rope_interleaved``).
SMOLLM2_135M = """{
  "architectures": [
    "LlamaForCausalLM"
  ],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 0,
  "eos_token_id": 0,
  "hidden_act": "silu",
  "hidden_size": 576,
  "initializer_range": 0.041666666666666664,
  "intermediate_size": 1536,
  "is_llama_config": true,
  "max_position_embeddings": 8192,
  "mlp_bias": false,
  "model_type": "llama",
  "num_attention_heads": 9,
  "num_hidden_layers": 30,
  "num_key_value_heads": 3,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_interleaved": false,
  "rope_scaling": null,
  "rope_theta": 100000,
  "tie_word_embeddings": true,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.40.1",
  "use_cache": true,
  "vocab_size": 49152
}
"""


@pytest.mark.parametrize("text", [QWEN25_05B_INSTRUCT, QWEN25_05B], ids=["instruct", "base"])
def test_published_qwen25_config_translates(tmp_path, text) -> None:
    (tmp_path / "config.json").write_text(text)
    fields = to_megatron_fields(read_hf_config(tmp_path), source=str(tmp_path / "config.json"))
    assert (fields["num_layers"], fields["hidden_size"], fields["num_query_groups"], fields["kv_channels"]) == (24, 896, 2, 64)
    assert fields["add_qkv_bias"] and not fields["add_bias_linear"] and fields["share_embeddings_and_output_weights"]
    assert fields["rotary_base"] == 1e6 and fields["layernorm_epsilon"] == 1e-6


def test_published_smollm2_config_translates(tmp_path) -> None:
    (tmp_path / "config.json").write_text(SMOLLM2_135M)
    fields = to_megatron_fields(read_hf_config(tmp_path))
    assert (fields["num_layers"], fields["hidden_size"], fields["num_query_groups"]) == (30, 576, 3)


@pytest.mark.parametrize("text,key,value", [
    (QWEN25_05B, "use_mrope", True),
    (QWEN25_05B, "use_mrope", 0),  # not false: the type must match too
    (SMOLLM2_135M, "rope_interleaved", True),
    (SMOLLM2_135M, "is_llama_config", False),
])
def test_harmless_keys_at_other_values_are_refused(text, key, value) -> None:
    config = {**json.loads(text), key: value}
    with pytest.raises(UnsupportedConfigError) as info:
        to_megatron_fields(config, source="hub/config.json")
    assert info.value.field == key and f"'{key}'" in str(info.value) and f"is {value!r}" in str(info.value)
    assert "hub/config.json" in str(info.value)


def test_harmless_keys_stay_unknown_to_other_architectures() -> None:
    config = {**json.loads(SMOLLM2_135M), "use_mrope": False}
    with pytest.raises(UnsupportedConfigError, match="unknown to the LlamaForCausalLM converter") as info:
        to_megatron_fields(config)
    assert info.value.field == "use_mrope"


def test_fifo_config_is_refused_without_blocking(tmp_path) -> None:
    os.mkfifo(tmp_path / "config.json")
    with pytest.raises(CheckpointFormatError, match="not a regular file") as info:
        read_hf_config(tmp_path)
    assert info.value.path == tmp_path / "config.json"
