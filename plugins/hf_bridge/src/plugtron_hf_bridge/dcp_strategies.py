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
megatron's own helpers and writes with torch's ``FileSystemWriter`` in the
calling thread (:class:`~.dcp_writer.ViewSafeFileSystemWriter`: without a
fresh copy of each view, and without zip CRCs in the tensor records, see
:func:`_without_crc32`): same ``torch_dist`` files, no helper process.

Both directions plan with :mod:`.dcp_planning`: torch's planning and
validation compare a layer stack's chunks pairwise (millions of pairs for a
12-layer, 64-expert model), the same checks by bucket do not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
from pathlib import Path
from typing import Any, Iterator

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME, TorchCommonLoadStrategy
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreLoadPlanner, MCoreSavePlanner, TorchDistLoadShardedStrategy, _replace_sharded_keys_with_state_dict_keys,
    _replace_state_dict_keys_with_sharded_keys, _restore_dict_types)
from torch.distributed.checkpoint import FileSystemReader
from torch.futures import Future

from plugtron.untrusted import regular_file_inside

from .dcp_metadata import read_metadata
from .dcp_planning import global_plan_errors, to_dcp_state_dict, unwrap
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

    def _read_directly(self, name: str, items: list[Any], planner: Any) -> list[Any]:
        """Read what :mod:`.dcp_direct` can straight into its parameters; return the items left for torch's reader."""
        from torch.distributed.checkpoint.planner import LoadItemType

        from . import dcp_direct

        rest, layouts, staging, frames = [], {}, dcp_direct.Staging(), dcp_direct.Layouts()
        with open(Path(self.path) / name, "rb") as handle:
            for item in items:
                info = self.storage_data[item.storage_index]
                if item.type != LoadItemType.TENSOR or info.transform_descriptors:
                    rest.append(item)
                    continue
                key = (info.offset, info.length)
                if key not in layouts:
                    layouts[key] = frames.get(handle, info.offset, info.length)
                target = planner.resolve_tensor(item).detach() if layouts[key] is not None else None
                if target is not None and dcp_direct.read_into(handle, layouts[key], tuple(item.storage_offsets),
                                                               tuple(item.lengths), target, staging):
                    planner.commit_tensor(item, target)
                else:
                    rest.append(item)
        return rest

    def read_data(self, plan: Any, planner: Any) -> Future:
        """torch's ``read_data`` one shard file at a time, so a failure names its file; plain tensor records are
        read straight into their parameters (:mod:`.dcp_direct`), the rest by torch's reader."""
        by_file: dict[str, list[Any]] = {}
        for item in plan.items:
            by_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for name, items in by_file.items():
            try:
                rest = self._read_directly(name, items, planner)
                if rest:
                    super().read_data(dataclasses.replace(plan, items=rest), planner).wait()
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
    """megatron's planner, unpickling ``ShardedObject`` payloads with ``weights_only=True``, planning reads by
    bucket (:func:`.dcp_planning.local_load_plan`: torch's read planning is quadratic in a layer stack's chunks)."""

    def create_local_plan(self) -> Any:
        from torch.distributed.checkpoint.planner import LoadPlan

        from .dcp_planning import local_load_plan

        # megatron's shape checks, then torch's default local plan by bucket (its fallback for checkpoints
        # written before torch 2.4, which nested keys differently, does not apply: megatron's keys are flat)
        self._validate_global_shapes(self.metadata, self.shapes_validation_sharded_tensors)
        with self._temporarily_bypass_shape_validation():
            return LoadPlan(local_load_plan(self.state_dict, self.metadata, strict=not self.allow_partial_load))

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
        pyt_state_dict = to_dcp_state_dict(flat, loading=True)
        reader = SafeFileSystemReader(checkpoint_dir)
        reader.read_metadata()  # here, not inside torch's collective, where errors must pickle
        load_state_dict(pyt_state_dict, reader, planner=planner)
        loaded = {key: unwrap(value) for key, value in pyt_state_dict.items()}
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

        from .dcp_writer import ViewSafeFileSystemWriter

        flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, keep_only_main_replica=True)
        writer = ViewSafeFileSystemWriter(checkpoint_dir, sync_files=True)
        planner = BucketedSavePlanner(dedup_replicated_tensors=False, flatten_state_dict=False)
        with _without_crc32():
            save(to_dcp_state_dict(flat, loading=False), storage_writer=writer, planner=planner)


class BucketedSavePlanner(MCoreSavePlanner):
    """megatron's save planner, validating the global plan by bucket (:func:`.dcp_planning.global_plan_errors`:
    torch's validation is quadratic in a layer stack's chunks); otherwise torch's global planning."""

    def create_global_plan(self, all_plans: list) -> tuple[list, Any]:
        from torch.distributed.checkpoint.default_planner import create_default_global_save_plan

        plans, metadata = create_default_global_save_plan(self._dedup_save_plans(all_plans))
        errors = global_plan_errors(metadata, len(plans))
        if errors:
            raise ValueError(f"Failed to validate global plan: {'; '.join(errors)[:500]}")
        self.global_plan, self.metadata = plans, metadata
        return plans, metadata


@contextlib.contextmanager
def _without_crc32() -> Iterator[None]:
    """``torch.save`` without CRC32s in its zip records, for the tensor records of a ``.distcp`` file.

    Why: computing them was a quarter to a third of writing a checkpoint here
    (0.2-0.25 s of 0.6-0.85 s for 0.47 GB), and nothing reads them: torch's
    checkpoint reader (``torch.load`` per record, which is how megatron-LM
    loads) does not check them, and neither does :mod:`.dcp_direct`. Only a
    zip tool run on a record would complain. ``common.pt`` (megatron's common
    strategy, written outside this block) keeps its CRCs, so
    :func:`.checkpoint.read_meta` can still test it as a zip.
    """
    import torch.serialization

    saved = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(saved)


def merge_in_place(sharded_state_dict: dict) -> dict:
    """Let megatron's factory merges hand back the parameter that was loaded in place instead of a new tensor.

    megatron saves a gated MLP's ``linear_fc1`` as its gate and up halves (a
    ``ShardedTensorFactory``); after loading, its merge concatenates them into
    a new tensor, which ``load_state_dict`` then copies into the parameter:
    184 MB of fresh memory and a copy for a 250M Llama (0.05-0.26 s here).
    The halves are views of the parameter and were loaded into it, so when
    they lie back to back in its memory the merge returns the parameter itself
    (``copy_`` onto the same memory is a no-op); in any other case megatron's
    own merge runs. Returns ``sharded_state_dict``, changed in place.
    """
    for factory in nested_values(sharded_state_dict):
        if isinstance(factory, ShardedTensorFactory) and isinstance(getattr(factory, "data", None), torch.Tensor):
            factory.merge_fn = functools.partial(_aliased_or_merged, factory.merge_fn, factory.data)
    return sharded_state_dict


def _aliased_or_merged(merge: Any, whole: "torch.Tensor", parts: Any) -> Any:
    if isinstance(parts, (list, tuple)) and _tile(whole, parts):
        return whole
    return merge(parts)


def _tile(whole: "torch.Tensor", parts: Any) -> bool:
    """``parts`` are contiguous, consecutive dim-0 blocks of ``whole``'s own memory, covering all of it."""
    if not whole.is_contiguous() or not parts or not all(isinstance(p, torch.Tensor) for p in parts):
        return False
    at = whole.data_ptr()
    for part in parts:
        if part.data_ptr() != at or not part.is_contiguous() or part.dtype != whole.dtype \
                or tuple(part.shape[1:]) != tuple(whole.shape[1:]):
            return False
        at += part.nbytes
    return at == whole.data_ptr() + whole.nbytes and sum(p.shape[0] for p in parts) == whole.shape[0]


def exact_shapes(sharded_state_dict: dict, metadata: Any) -> dict:
    """Load tensors whose global shape matches the checkpoint's as exact-shape tensors.

    megatron marks the embedding and output layer ``allow_shape_mismatch``
    (their vocabulary padding may differ between layouts), and zeroes such
    tensors before loading, since only their overlap with the checkpoint is
    read. :func:`.checkpoint.keep_padding` makes the padded size the saved one,
    so the shapes match and the zeroing (two vocabulary-sized tensors, 0.03-0.07 s
    for a 250M model) only costs; marked exact, they are also checked by the
    planner's shape validation. A tensor whose shape differs keeps the flag.
    """
    entries = getattr(metadata, "state_dict_metadata", {})
    for tensor in nested_values(sharded_state_dict):
        if isinstance(tensor, ShardedTensor) and tensor.allow_shape_mismatch:
            stored = getattr(entries.get(tensor.key), "size", None)
            if stored is not None and tuple(stored) == tuple(tensor.global_shape):
                tensor.allow_shape_mismatch = False
    return sharded_state_dict
