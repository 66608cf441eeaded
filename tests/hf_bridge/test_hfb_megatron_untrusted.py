"""megatron checkpoints from strangers: nothing in them runs, every broken file is one clear error.

A crafted pickle here creates a *marker* directory when unpickled (``os.mkdir``
in ``__reduce__``); each attack test asserts the refusal names the file and
that the marker does not exist afterwards. The checkpoints are a tiny Llama
converted once per module and copied per test.
"""

from __future__ import annotations

import io
import multiprocessing.process
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from plugtron.untrusted import MAX_JSON_BYTES
from plugtron_hf_bridge.checkpoint import bridge_meta, load_megatron, read_meta, save_megatron, tokenizer_files
from plugtron_hf_bridge.errors import CheckpointFormatError
from plugtron_hf_bridge.importer import import_hf

from hfb_helpers import make_hf

REPO = Path(__file__).resolve().parents[2]


class Payload:
    """Unpickling this runs ``os.mkdir(marker)``: what a hostile checkpoint would do, made visible."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


@pytest.fixture(scope="module")
def imported(tmp_path_factory, plugtron_single_rank, pm) -> Any:
    src = make_hf(tmp_path_factory.mktemp("hf") / "hf", "LlamaForCausalLM", layers=2, tokenizer=True)
    return import_hf(src, pm=pm, parallel=plugtron_single_rank)


def _save(imported: Any, dst: Path) -> Path:
    plan = imported.plan
    return save_megatron(dst, imported.built, plan.config, meta=bridge_meta(plan.architecture, plan.hf_config, plan.config),
                         extra_files=[plan.source / name for name in plan.tokenizer_files])


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, imported) -> Path:
    return _save(imported, tmp_path_factory.mktemp("pristine") / "meg")


@pytest.fixture
def meg(tmp_path, pristine) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "meg", symlinks=True))


@pytest.fixture
def marker(tmp_path) -> Iterator[Path]:
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a pickle from the checkpoint ran code"


def refused(call: Any, *needles: str) -> CheckpointFormatError:
    with pytest.raises(CheckpointFormatError) as info:
        call()
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    for needle in needles:
        assert needle in message, (needle, message)
    return info.value


def _metadata(meg: Path) -> Any:
    with open(meg / "weights" / ".metadata", "rb") as handle:
        return pickle.load(handle)  # our own fresh checkpoint: trusted


def _write_metadata(meg: Path, metadata: Any) -> None:
    (meg / "weights" / ".metadata").write_bytes(pickle.dumps(metadata))


# -- pickles that would run code ------------------------------------------------------------------------------------
def test_the_payload_is_live(tmp_path) -> None:
    """Control: plain pickle runs it, so a missing marker below means it was refused."""
    pickle.loads(pickle.dumps(Payload(tmp_path / "control")))
    assert (tmp_path / "control").is_dir()


def test_crafted_metadata_is_refused_before_any_rank_and_by_the_loader(meg, marker, plugtron_single_rank, pm) -> None:
    metadata = _metadata(meg)
    metadata.planner_data = Payload(marker)
    _write_metadata(meg, metadata)
    path = str(meg / "weights" / ".metadata")
    refused(lambda: read_meta(meg), path, "posix.mkdir")
    refused(lambda: load_megatron(meg, pm=pm, parallel=plugtron_single_rank), path, "posix.mkdir")


def test_crafted_metadata_is_refused_by_the_rank_side_reader(meg, pristine, marker) -> None:
    """As if swapped in after read_meta: the strategies read it with the same allow-list."""
    from plugtron_hf_bridge.dcp_strategies import SafeFileSystemReader

    metadata = _metadata(meg)
    metadata.storage_meta = Payload(marker)
    _write_metadata(meg, metadata)
    refused(lambda: SafeFileSystemReader(meg / "weights").read_metadata(), ".metadata", "posix.mkdir")


def test_crafted_metadata_through_the_cli_is_one_line(meg, marker, tmp_path) -> None:
    metadata = _metadata(meg)
    metadata.planner_data = Payload(marker)
    _write_metadata(meg, metadata)
    run = subprocess.run([sys.executable, "-m", "plugtron.cli", "convert", str(meg), str(tmp_path / "out"), "--to", "hf",
                          "--no-progress"], capture_output=True, text=True, cwd=REPO, timeout=300)
    err = run.stderr.strip()
    assert run.returncode == 2, (run.returncode, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert str(meg / "weights" / ".metadata") in err and "posix.mkdir" in err, err
    assert not (tmp_path / "out").exists()


def test_shard_file_bytes_are_unpickled_weights_only(meg, marker, plugtron_single_rank, pm) -> None:
    """``_extra_state`` objects travel as pickles inside the shards; torch's planner loads them unrestricted."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = _metadata(meg)
    evil = io.BytesIO()
    torch.save([Payload(marker)], evil)
    (meg / "weights" / "__9_0.distcp").write_bytes(evil.getvalue())
    index = next(i for i in metadata.storage_data if isinstance(metadata.state_dict_metadata[i.fqn], BytesStorageMetadata))
    info = metadata.storage_data[index]
    info.relative_path, info.offset, info.length = "__9_0.distcp", 0, len(evil.getvalue())
    _write_metadata(meg, metadata)
    read_meta(meg)  # nothing wrong with the table of contents itself
    refused(lambda: load_megatron(meg, pm=pm, parallel=plugtron_single_rank), str(meg / "weights" / "__9_0.distcp"))


def test_common_pt_is_weights_only_even_if_the_environment_says_otherwise(meg, marker, plugtron_single_rank, pm,
                                                                         monkeypatch) -> None:
    torch.save({"args": Payload(marker)}, meg / "weights" / "common.pt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # megatron's bare torch.load would obey it
    read_meta(meg)
    refused(lambda: load_megatron(meg, pm=pm, parallel=plugtron_single_rank), str(meg / "weights" / "common.pt"), "posix.mkdir")


def test_metadata_with_megatrons_save_plans_still_loads(meg, plugtron_single_rank, pm) -> None:
    """megatron-LM stores every rank's save plan in ``.metadata``: those classes are allowed."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    metadata = _metadata(meg)
    chunk = ChunkStorageMetadata(offsets=torch.Size([0]), sizes=torch.Size([4]))
    item = WriteItem(index=MetadataIndex("x", torch.Size([0])), type=WriteItemType.SHARD,
                     tensor_data=TensorWriteData(chunk=chunk, properties=TensorProperties(dtype=torch.bfloat16),
                                                 size=torch.Size([4])))
    metadata.all_local_plans = [SavePlan(items=[item], planner_data={})]
    _write_metadata(meg, metadata)
    read_meta(meg)
    load_megatron(meg, pm=pm, parallel=plugtron_single_rank)


def test_shard_path_leaving_the_directory_is_refused(meg, tmp_path) -> None:
    metadata = _metadata(meg)
    next(iter(metadata.storage_data.values())).relative_path = "../../secret.distcp"
    _write_metadata(meg, metadata)
    refused(lambda: read_meta(meg), str(meg / "weights" / ".metadata"), "'../../secret.distcp'")


# -- missing, truncated and malformed files -------------------------------------------------------------------------
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("name,damage,needle", [
    ("weights/__0_0.distcp", Path.unlink, "file not found"),
    ("weights/__0_0.distcp", _truncate, "truncated"),
    ("weights/.metadata", Path.unlink, "file not found"),
    ("weights/.metadata", _truncate, "unreadable distributed-checkpoint metadata"),
    ("weights/common.pt", Path.unlink, "file not found"),
    ("weights/common.pt", _truncate, "truncated"),
    ("weights/metadata.json", Path.unlink, "file not found"),
    ("weights/metadata.json", _truncate, "not valid JSON"),
    ("plugtron_model.json", _truncate, "not valid JSON"),
])
def test_damaged_megatron_file_is_named(meg, name, damage, needle) -> None:
    damage(meg / name)
    refused(lambda: read_meta(meg), str(meg / name), needle)


def test_other_backend_in_metadata_json_is_named(meg) -> None:
    (meg / "weights" / "metadata.json").write_text('{"sharded_backend": "zarr"}')
    refused(lambda: read_meta(meg), "metadata.json", "'sharded_backend'", "'zarr'")


@pytest.mark.parametrize("key", ["architecture", "padded_vocab_size", "hf_config", "format"])
def test_hf_bridge_json_missing_key_is_named(meg, key) -> None:
    import json

    path = meg / "hf_bridge.json"
    meta = json.loads(path.read_text())
    del meta[key]
    path.write_text(json.dumps(meta))
    refused(lambda: read_meta(meg), str(path), f"missing key '{key}'")


def test_hf_bridge_json_wrong_type_is_named(meg) -> None:
    import json

    path = meg / "hf_bridge.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "padded_vocab_size": "128"}))
    refused(lambda: read_meta(meg), str(path), "'padded_vocab_size'", "positive integer")


def test_hf_bridge_json_not_json(meg) -> None:
    (meg / "hf_bridge.json").write_text("{architecture: Llama")
    refused(lambda: read_meta(meg), str(meg / "hf_bridge.json"), "not valid JSON")


def test_hf_bridge_json_huge_is_refused_unread(meg) -> None:
    path = meg / "hf_bridge.json"
    with open(path, "r+b") as handle:
        handle.truncate(MAX_JSON_BYTES + 1)  # sparse: nothing is written, nothing must be read
    refused(lambda: read_meta(meg), str(path), "limit")


def test_hf_bridge_json_link_to_dev_zero_is_refused(meg) -> None:
    (meg / "hf_bridge.json").unlink()
    (meg / "hf_bridge.json").symlink_to("/dev/zero")
    refused(lambda: read_meta(meg), str(meg / "hf_bridge.json"))


def test_corrupt_shard_found_by_the_loader_is_named(meg, plugtron_single_rank, pm) -> None:
    """Right size, wrong bytes: only reading finds it, inside megatron's load; still one line with the file."""
    path = meg / "weights" / "__0_0.distcp"
    path.write_bytes(bytes(path.stat().st_size))
    read_meta(meg)
    refused(lambda: load_megatron(meg, pm=pm, parallel=plugtron_single_rank), str(path), "cannot be read")


# -- tokenizer files copied on export -------------------------------------------------------------------------------
def test_tokenizer_link_out_of_the_checkpoint_is_refused(meg, tmp_path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("id_rsa")
    (meg / "tokenizer_config.json").unlink()
    (meg / "tokenizer_config.json").symlink_to(secret)
    refused(lambda: tokenizer_files(meg, ["tokenizer_config.json"]), str(meg / "tokenizer_config.json"), "outside")
    refused(lambda: read_meta(meg), str(meg / "tokenizer_config.json"))


# -- saving forks nothing -------------------------------------------------------------------------------------------
def test_save_starts_no_helper_process(imported, tmp_path, monkeypatch) -> None:
    """megatron's default writer spawns a manager and forks writers; one killed hung the save for minutes."""
    import psutil

    started: list[str] = []

    def refuse(process: Any) -> None:
        started.append(repr(process))
        raise RuntimeError(f"save started a helper process: {process!r}")

    before = {child.pid for child in psutil.Process().children(recursive=True)}
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)
    meg = _save(imported, tmp_path / "meg")
    after = {child.pid for child in psutil.Process().children(recursive=True)}
    assert started == [] and after <= before, (started, after - before)
    assert sorted(p.name for p in (meg / "weights").iterdir()) == [".metadata", "__0_0.distcp", "common.pt", "metadata.json"]
