"""megatron ``dist_checkpointing`` strategies that read strangers' files safely and save in-process.

``dist_checkpointing.load`` and ``save`` take strategy objects; passing these
changes what megatron does without patching any of its globals.

Loading (format ``torch_dist``, what megatron-LM writes and reads):

- :class:`SafeTorchDistLoadStrategy` reads ``.metadata`` through
  :func:`~plugtron_hf_bridge.dcp_metadata.read_metadata` (allow-listed
  unpickler) instead of ``pickle.load``, and unpickles megatron's
  ``ShardedObject`` payloads (``_extra_state``) with ``weights_only=True``
  where torch's default planner uses ``weights_only=False``. Tensor payloads
  already go through ``torch.load(weights_only=True)`` in torch's reader. A
  shard that cannot be read is reported with its file name.
- :class:`SafeCommonLoadStrategy` loads ``common.pt`` with an explicit
  ``weights_only=True``: megatron 0.16.1 leaves the argument out, so the
  environment variable ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` would turn its
  load into a full unpickle.

Saving: megatron's ``TorchDistSaveShardedStrategy`` writes through
``FileSystemWriterAsync``, which starts a ``multiprocessing`` manager (a spawned
interpreter, ~3 s the first time, left running afterwards) and forks one writer
per bucket; if a writer dies the parent waits on a queue forever.
:class:`InProcessTorchDistSaveStrategy` translates the state dict with
megatron's own helpers and writes with torch's plain ``FileSystemWriter`` in
the calling thread: same ``torch_dist`` files, no helper process.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME, TorchCommonLoadStrategy
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreLoadPlanner, MCoreSavePlanner, TorchDistLoadShardedStrategy, _replace_sharded_keys_with_state_dict_keys,
    _replace_state_dict_keys_with_sharded_keys, _restore_dict_types, _unwrap_pyt_sharded_tensor,
    mcore_to_pyt_state_dict)
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.futures import Future

from plugtron.untrusted import regular_file_inside

from .dcp_metadata import read_metadata
from .errors import CheckpointFormatError, checkpoint_errors

BACKEND, VERSION = "torch_dist", 1


class SafeFileSystemReader(FileSystemReader):
    """torch's reader, with the metadata read by the allow-listed unpickler and errors named per shard file."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self._metadata: Any = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import StorageMeta

        if kwargs.get("rank") is not None:  # per-rank ``__N.metadata`` files: megatron never writes them
            raise CheckpointFormatError(self.path, "per-rank metadata files are not supported")
        if self._metadata is None:  # read once, in this process: what was checked is what is used
            self._metadata = read_metadata(self.path)
        metadata = self._metadata
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: Any, planner: Any) -> Future:
        """torch's ``read_data`` one shard file at a time, so a failure names its file."""
        by_file: dict[str, list[Any]] = {}
        for item in plan.items:
            by_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for name, items in by_file.items():
            try:
                super().read_data(dataclasses.replace(plan, items=items), planner).wait()
            except Exception as exc:  # torch pickles it to every rank: a plain, picklable error
                problem = exc.problem if isinstance(exc, CheckpointFormatError) else _first_line(exc)
                raise ShardReadError(str(Path(self.path) / name), f"cannot be read ({problem})") from exc
        done: Future = Future()
        done.set_result(None)
        return done


class ShardReadError(Exception):
    """A shard file failed to load; ``(path, problem)`` as its args, so torch can pickle it between ranks.

    (:class:`CheckpointFormatError` cannot be unpickled from its message alone;
    :func:`plugtron_hf_bridge.checkpoint.load_error` turns this into one.)
    """

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(path, problem)
        self.path, self.problem = path, problem

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


class SafeLoadPlanner(MCoreLoadPlanner):
    """megatron's planner, unpickling ``ShardedObject`` payloads with ``weights_only=True``."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        import torch
        from torch.distributed.checkpoint._traverse import set_element

        loaded = torch.load(value, map_location="cpu", weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


class SafeTorchDistLoadStrategy(TorchDistLoadShardedStrategy):
    """``TorchDistLoadShardedStrategy.load`` with :class:`SafeFileSystemReader` and :class:`SafeLoadPlanner`.

    megatron builds its reader and planner inside ``load``, so the steps are
    composed here from its helpers (same order: translate keys, load, unwrap).
    """

    def load(self, sharded_state_dict: dict, checkpoint_dir: str | Path) -> dict:
        from torch.distributed.checkpoint.state_dict_loader import load_state_dict

        tensors = [t for t in nested_values(sharded_state_dict) if isinstance(t, ShardedTensor)]
        planner = SafeLoadPlanner(
            shapes_validation_sharded_tensors=[t for t in tensors if not t.allow_shape_mismatch],
            allow_shape_mismatch_sharded_tensors={t.key: t for t in tensors if t.allow_shape_mismatch})
        flat, flat_mapping, rename_mapping = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict)
        pyt_state_dict = mcore_to_pyt_state_dict(flat, True)
        reader = SafeFileSystemReader(checkpoint_dir)
        reader.read_metadata()  # here, not inside torch's collective, where errors must pickle
        load_state_dict(pyt_state_dict, reader, planner=planner)
        loaded = {key: _unwrap_pyt_sharded_tensor(value) for key, value in pyt_state_dict.items()}
        loaded = _replace_sharded_keys_with_state_dict_keys(loaded, flat_mapping, rename_mapping)
        _restore_dict_types(loaded, sharded_state_dict)
        return loaded

    def load_tensors_metadata(self, checkpoint_dir: Path, metadata: Any = None) -> dict:
        return super().load_tensors_metadata(checkpoint_dir, metadata or read_metadata(checkpoint_dir))

    def load_sharded_metadata(self, checkpoint_dir: Path) -> dict:
        """Tensors and objects in the checkpoint (megatron's version re-reads ``.metadata`` with ``pickle.load``)."""
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata

        metadata = read_metadata(checkpoint_dir)
        objects = [ShardedObject.empty_from_unique_key(key) for key, entry in metadata.state_dict_metadata.items()
                   if isinstance(entry, BytesStorageMetadata)]
        return {**{obj.unique_key: obj for obj in objects}, **self.load_tensors_metadata(checkpoint_dir, metadata)}


class SafeCommonLoadStrategy(TorchCommonLoadStrategy):
    """``common.pt`` as a regular file inside the checkpoint, loaded with ``weights_only=True`` whatever the environment."""

    def load_common(self, checkpoint_dir: str | Path) -> Any:
        import torch

        with checkpoint_errors():
            path = regular_file_inside(checkpoint_dir, COMMON_STATE_FNAME)
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointFormatError(path, f"cannot be loaded ({_first_line(exc)})") from exc

    def load_sharded_objects(self, sharded_objects_state_dict: Any, checkpoint_dir: str | Path) -> Any:
        """Never needed (the sharded strategy loads objects itself); megatron's version unpickles freely."""
        raise CheckpointFormatError(checkpoint_dir, "separate sharded-object files are not supported")


#: Lines of torch's ``weights_only`` refusal that are advice, not the reason.
_TORCH_ADVICE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _first_line(exc: BaseException) -> str:
    """One line of an error; for torch's ``weights_only`` refusal, the line with the reason.

    Why: that error runs to a dozen lines whose first advises re-running with
    ``weights_only=False``, the one thing not to do with a stranger's file.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if lines and lines[0].startswith(_TORCH_ADVICE[0]):
        reasons = [line for line in lines if not line.startswith(_TORCH_ADVICE)]
        return f"refused by the weights-only unpickler: {reasons[0] if reasons else 'unsupported content'}"
    return lines[0] if lines else type(exc).__name__


class InProcessTorchDistSaveStrategy(SaveShardedStrategy):
    """Writes the ``torch_dist`` format in the calling thread: no forked writer, no manager process."""

    def __init__(self) -> None:
        super().__init__(BACKEND, VERSION)

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True  # ShardedObjects travel inside the DCP files as bytes, as megatron's own strategy does

    def save(self, sharded_state_dict: dict, checkpoint_dir: str | Path) -> None:
        from torch.distributed.checkpoint import save

        flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, keep_only_main_replica=True)
        writer = FileSystemWriter(checkpoint_dir, single_file_per_rank=True, sync_files=True, thread_count=1)
        planner = MCoreSavePlanner(dedup_replicated_tensors=False, flatten_state_dict=False)
        save(mcore_to_pyt_state_dict(flat, False), storage_writer=writer, planner=planner)
