"""megatron-core distributed checkpoints of converted models.

Layout of a checkpoint directory::

    plugtron_model.json   the plugtron config (plugtron.config.save), layout of the save
    hf_bridge.json        architecture, the source HF config.json, the padded vocab size
    weights/              megatron.core.dist_checkpointing (torch_dist backend)
    tokenizer files       copied from the HF source when it had them

``dist_checkpointing`` stores every tensor under its *global* key with its
global shape, so a checkpoint saved at one TP/PP/VP layout loads at any
other: :func:`load_megatron` builds the model for the requested layout on the
meta device and lets ``dist_checkpointing.load`` fill each rank's shards.
The vocabulary padding is the one exception megatron does not reshard, so the
loader keeps the saved padded size (adjusting ``make_vocab_size_divisible_by``).

Saving is atomic: all ranks write into a temporary directory next to the
destination, and rank 0 renames it after a barrier; a failure removes it.
It writes in-process (:class:`~plugtron_hf_bridge.dcp_strategies.InProcessTorchDistSaveStrategy`):
megatron's default torch_dist writer forks helper processes and, if one dies,
waits for it forever.

A checkpoint to load may come from a stranger. :func:`read_meta` checks every
file before any rank starts (one :class:`CheckpointFormatError` naming the file
and key); the ranks then load through strategies that never unpickle anything
but allow-listed metadata classes and ``weights_only`` payloads
(:mod:`~plugtron_hf_bridge.dcp_metadata`, :mod:`~plugtron_hf_bridge.dcp_strategies`).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import attrs

from plugtron.errors import PlugtronError
from plugtron.untrusted import read_bytes_capped, read_json, regular_file_inside

from .errors import CheckpointFormatError, ConversionError, checkpoint_errors

if TYPE_CHECKING:
    from plugtron.manager import PlugtronPluginManager
    from plugtron.pipeline import BuiltModel

META_FILE = "hf_bridge.json"
WEIGHTS_DIR = "weights"
CONFIG_FILE = "plugtron_model.json"
DCP_CONFIG_FILE = "metadata.json"  # megatron's CheckpointingConfig: which backends wrote weights/
COMMON_FILE = "common.pt"  # megatron's non-sharded state (``{}`` for our models)
#: common.pt of a megatron-LM training checkpoint holds args and RNG states: kilobytes to a few MB.
MAX_COMMON_BYTES = 256 * 2**20
#: hf_bridge.json: key -> (type, description) that every later step relies on.
META_KEYS: dict[str, tuple[type, str]] = {
    "format": (int, "the integer 1"), "architecture": (str, "an HF architecture name"),
    "padded_vocab_size": (int, "a positive integer"), "hf_config": (dict, "the source config.json object"),
}


@attrs.define
class LoadedModel:
    built: "BuiltModel"
    config: Any
    meta: dict[str, Any]
    tokenizer_files: list[Path]


def _sharded_state_dict(chunks: list) -> dict[str, Any]:
    """One entry per model chunk; tensor keys inside are global, so layouts can differ."""
    from plugtron.sharding import unwrap

    return {f"chunk{i}": unwrap(chunk).sharded_state_dict() for i, chunk in enumerate(chunks)}


def _broadcast(value: Any) -> Any:
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def save_megatron(dst: str | Path, built: "BuiltModel", config: Any, *, meta: dict[str, Any],
                  extra_files: Iterable[Path] = (), overwrite: bool = False) -> Path:
    """Write a megatron distributed checkpoint plus plugtron/bridge metadata (all ranks call it)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from plugtron._atomic import atomic_output_dir
    from plugtron.config import save as save_config

    from .dcp_strategies import InProcessTorchDistSaveStrategy
    from .exporter import refuse_existing
    from .importer import plain_torch
    from .libraries import collections_paused

    dst = Path(dst)
    refuse_existing(dst, overwrite)
    rank0 = dist.get_rank() == 0
    with contextlib.ExitStack() as stack:
        stack.enter_context(collections_paused())
        tmp = stack.enter_context(atomic_output_dir(dst, overwrite=overwrite)) if rank0 else None
        if rank0:
            (tmp / WEIGHTS_DIR).mkdir()
        tmp = Path(_broadcast(str(tmp) if rank0 else None))
        with plain_torch():  # see plain_torch: 6,000 torch calls, none naming a device
            dist_checkpointing.save(_sharded_state_dict(built.chunks), str(tmp / WEIGHTS_DIR),
                                    sharded_strategy=InProcessTorchDistSaveStrategy())
        if rank0:
            save_config(config, tmp / CONFIG_FILE)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            for path in extra_files:
                shutil.copy2(path, tmp / path.name)
        dist.barrier()
    dist.barrier()
    return dst


def bridge_meta(architecture: str, hf_config: dict[str, Any], config: Any) -> dict[str, Any]:
    return {"format": 1, "architecture": architecture, "hf_config": hf_config,
            "padded_vocab_size": config.padded_vocab_size()}


def read_meta(src: str | Path, *, inert: bool = False) -> dict[str, Any]:
    """``hf_bridge.json`` of a checkpoint whose every file was checked first; runs before any rank starts.

    ``inert=True`` (a launcher, before it starts ranks) reads ``.metadata``
    without importing torch (see :mod:`.dcp_metadata`); the ranks read it again.

    Each problem is a :class:`CheckpointFormatError` naming the file (and the
    key): a missing or non-regular file, a link out of the checkpoint, bad or
    huge JSON, a missing key, a ``.metadata`` that is not plain
    distributed-checkpoint metadata, a shard file shorter than it claims, a
    tokenizer file that links out of the checkpoint.
    """
    src = Path(src)
    if not src.is_dir():
        raise CheckpointFormatError(src, "not a plugtron megatron checkpoint directory")
    for name in (META_FILE, CONFIG_FILE):
        if not ((src / name).exists() or (src / name).is_symlink()):
            raise CheckpointFormatError(src / name, "file not found: not a plugtron megatron checkpoint")
    with checkpoint_errors():
        meta = _read_bridge_meta(src)
        read_json(regular_file_inside(src, CONFIG_FILE))
        weights = _weights_dir(src)
        check_dcp_config(weights)
        _check_common(weights)
    from .dcp_metadata import read_metadata
    from .importer import TOKENIZER_FILES

    read_metadata(weights, inert=inert)
    tokenizer_files(src, TOKENIZER_FILES)
    return meta


def _read_bridge_meta(src: Path) -> dict[str, Any]:
    path = regular_file_inside(src, META_FILE)
    meta = read_json(path)
    for key, (kind, what) in META_KEYS.items():
        if key not in meta:
            raise CheckpointFormatError(path, f"missing key '{key}' ({what})")
        value = meta[key]
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is str and not value):
            raise CheckpointFormatError(path, f"key '{key}' must be {what}, not {value!r:.80}")
    if meta["format"] != 1:
        raise CheckpointFormatError(path, f"key 'format' is {meta['format']}; this plugtron reads format 1")
    if meta["padded_vocab_size"] <= 0:
        raise CheckpointFormatError(path, f"key 'padded_vocab_size' must be {META_KEYS['padded_vocab_size'][1]}, "
                                          f"not {meta['padded_vocab_size']}")
    return meta


def _weights_dir(src: Path) -> Path:
    weights = src / WEIGHTS_DIR
    if weights.is_symlink() or not weights.is_dir():
        raise CheckpointFormatError(weights, "missing (or not a plain directory): the megatron weights live here")
    return weights


def check_dcp_config(weights: Path) -> None:
    """``metadata.json`` is megatron's own (torch_dist weights, torch common state).

    Why: megatron reads it again with a bare ``json.load`` (no size cap, any
    keys passed to a dataclass) inside ``dist_checkpointing.load``. It is
    checked here, in the launcher, and again by each rank right before that
    read; a file swapped in between can still only make megatron fail or
    wait: JSON cannot run code.
    """
    path = regular_file_inside(weights, DCP_CONFIG_FILE)
    config = read_json(path)
    expected = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                "common_backend": "torch", "common_backend_version": 1}
    if "sharded_backend" not in config:
        raise CheckpointFormatError(path, "missing key 'sharded_backend'")
    for key, value in config.items():
        if key not in expected:
            raise CheckpointFormatError(path, f"unknown key '{key}'")
        if value != expected[key]:
            raise CheckpointFormatError(path, f"key '{key}' is {value!r}; only {expected[key]!r} is supported")


def _check_common(weights: Path) -> None:
    """``common.pt`` is a complete zip (torch's format); its content is loaded later, ``weights_only``."""
    import zipfile

    path = regular_file_inside(weights, COMMON_FILE)
    raw = read_bytes_capped(path, MAX_COMMON_BYTES)
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointFormatError(path, f"is truncated or not a torch file ({exc})") from exc
    if bad is not None:
        raise CheckpointFormatError(path, f"is corrupt (member {bad} fails its checksum)")


def keep_padding(config: Any, padded: int, tp: int) -> None:
    """Make the new layout pad the vocabulary to the saved size (megatron cannot reshard padding)."""
    if padded % tp:
        raise ConversionError(f"the checkpoint's padded vocabulary ({padded} rows) cannot be split over tp={tp}")
    config.make_vocab_size_divisible_by = padded // tp
    if config.padded_vocab_size() != padded:
        raise ConversionError(f"cannot reproduce the checkpoint's padded vocabulary {padded} at tp={tp}")


def load_megatron(src: str | Path, *, tp: int = 1, pp: int = 1, vp: int | None = None,
                  pm: "PlugtronPluginManager | None" = None, parallel: Any = None,
                  meta: dict[str, Any] | None = None, pre_wrap_hooks: Sequence[Any] = (),
                  post_wrap_hooks: Sequence[Any] = (), ep: int | None = None, etp: int | None = None) -> LoadedModel:
    """Build the model for the requested layout and load the checkpoint into it.

    ``meta``: what :func:`read_meta` returned for ``src`` in this process, when the caller already checked it.
    ``pre_wrap_hooks`` / ``post_wrap_hooks``: as for :func:`plugtron.pipeline.build_model`.
    ``ep`` / ``etp``: the expert layout of a MoE model (default: ``parallel``'s, else 1 and ``tp``); experts
    are stored under global indices, so any expert layout loads any other's save.
    """
    from .importer import expert_layout
    from .libraries import collections_paused

    with collections_paused():
        return _load(Path(src), (tp, pp, vp) + expert_layout(ep, etp, tp, parallel), pm, parallel, meta,
                     (pre_wrap_hooks, post_wrap_hooks))


def _load(src: Path, layout: tuple, pm: Any, parallel: Any, meta: dict[str, Any] | None,
          hooks: tuple[Sequence[Any], Sequence[Any]]) -> LoadedModel:
    from plugtron.builder import BuildOptions
    from plugtron.config import load as load_config
    from plugtron.manager import get_plugin_manager
    from plugtron.pipeline import build_model
    from plugtron.runtime.parallel import initialize_parallel

    from .importer import TOKENIZER_FILES, set_layout

    tp, pp, vp, ep, etp = layout
    meta = meta if meta is not None else read_meta(src)
    pm = pm or get_plugin_manager()
    config = load_config(src / CONFIG_FILE, pm)
    set_layout(config, tp, pp, vp, str(config.params_dtype).removeprefix("torch."), ep=ep, etp=etp)
    keep_padding(config, int(meta["padded_vocab_size"]), tp)
    config.finalize()
    parallel = parallel or initialize_parallel(tp, pp, vp, ep=ep, etp=etp)
    weights = str(src / WEIGHTS_DIR)
    options = BuildOptions(meta_device=True, load_weights=lambda chunk, context: _load_chunk(chunk, weights))
    built = build_model(config, parallel=parallel, options=options, pm=pm, pre_wrap_hooks=hooks[0],
                        post_wrap_hooks=hooks[1])
    return LoadedModel(built, config, meta, tokenizer_files(src, TOKENIZER_FILES))


def tokenizer_files(src: Path, names: Iterable[str]) -> list[Path]:
    """The tokenizer files present, each a regular file inside ``src``: they are copied into the export,
    so a link to ``~/.ssh/id_rsa`` would copy it; it is refused by name instead."""
    with checkpoint_errors():
        return [path for name in names if (path := regular_file_inside(src, name, required=False)) is not None]


def _load_chunk(chunk: Any, weights: str) -> None:
    """dist_checkpointing reads this chunk's shards (a collective: every rank has as many chunks).

    Any failure inside megatron's or torch's load becomes a
    :class:`CheckpointFormatError` naming the shard file when one is known.
    """
    from megatron.core import dist_checkpointing

    from plugtron.sharding import unwrap

    from .dcp_metadata import read_metadata
    from .dcp_strategies import SafeCommonLoadStrategy, SafeTorchDistLoadStrategy, exact_shapes, merge_in_place
    from .importer import plain_torch

    inner = unwrap(chunk)
    with checkpoint_errors():
        check_dcp_config(Path(weights))  # megatron re-reads it just below
    try:
        with plain_torch():  # see plain_torch: 8,000 torch calls, none naming a device
            wanted = exact_shapes(merge_in_place(inner.sharded_state_dict()), read_metadata(weights))
            loaded = dist_checkpointing.load({"chunk": wanted}, weights,
                                             sharded_strategy=SafeTorchDistLoadStrategy(),
                                             common_strategy=SafeCommonLoadStrategy())
    except PlugtronError:
        raise
    except (Exception, _checkpoint_exception()) as exc:
        raise load_error(exc, weights) from exc
    inner.load_state_dict(loaded["chunk"], strict=True)


def _checkpoint_exception() -> type[BaseException]:
    from torch.distributed.checkpoint import CheckpointException

    return CheckpointException  # a BaseException: ``except Exception`` misses it


def load_error(exc: BaseException, weights: str | Path) -> CheckpointFormatError:
    """One line for a failed load: the first rank's own error, by shard file where it names one."""
    from .dcp_strategies import ShardReadError

    failures = [failure[0] for failure in getattr(exc, "failures", {}).values()] or [exc]
    for failure in failures:
        if isinstance(failure, ShardReadError):
            return CheckpointFormatError(failure.path, failure.problem)
        if isinstance(failure, PlugtronError):
            return CheckpointFormatError(weights, str(failure))
    first = failures[0]
    text = (str(first).strip().splitlines() or [""])[0]
    return CheckpointFormatError(weights, f"cannot be loaded ({type(first).__name__}: {text})")
