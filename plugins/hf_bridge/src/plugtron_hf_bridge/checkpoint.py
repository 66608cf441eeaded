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

Known megatron-core 0.16.1 behaviour: its torch_dist writer forks helper
processes and needs ``psutil``; if a helper dies, the save waits forever.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import attrs

from .errors import CheckpointFormatError, ConversionError

if TYPE_CHECKING:
    from plugtron.manager import PlugtronPluginManager
    from plugtron.pipeline import BuiltModel

META_FILE = "hf_bridge.json"
WEIGHTS_DIR = "weights"
CONFIG_FILE = "plugtron_model.json"


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

    from .exporter import refuse_existing

    dst = Path(dst)
    refuse_existing(dst, overwrite)
    rank0 = dist.get_rank() == 0
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_output_dir(dst, overwrite=overwrite)) if rank0 else None
        if rank0:
            (tmp / WEIGHTS_DIR).mkdir()
        tmp = Path(_broadcast(str(tmp) if rank0 else None))
        dist_checkpointing.save(_sharded_state_dict(built.chunks), str(tmp / WEIGHTS_DIR))
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


def read_meta(src: Path) -> dict[str, Any]:
    for name in (META_FILE, CONFIG_FILE):
        if not (src / name).is_file():
            raise CheckpointFormatError(src, f"not a plugtron megatron checkpoint ({name} missing)")
    try:
        return json.loads((src / META_FILE).read_text())
    except ValueError as exc:
        raise CheckpointFormatError(src / META_FILE, f"unreadable: {exc}") from exc


def keep_padding(config: Any, padded: int, tp: int) -> None:
    """Make the new layout pad the vocabulary to the saved size (megatron cannot reshard padding)."""
    if padded % tp:
        raise ConversionError(f"the checkpoint's padded vocabulary ({padded} rows) cannot be split over tp={tp}")
    config.make_vocab_size_divisible_by = padded // tp
    if config.padded_vocab_size() != padded:
        raise ConversionError(f"cannot reproduce the checkpoint's padded vocabulary {padded} at tp={tp}")


def load_megatron(src: str | Path, *, tp: int = 1, pp: int = 1, vp: int | None = None,
                  pm: "PlugtronPluginManager | None" = None, parallel: Any = None) -> LoadedModel:
    """Build the model for the requested layout and load the checkpoint into it."""
    from plugtron.builder import BuildOptions
    from plugtron.config import load as load_config
    from plugtron.manager import get_plugin_manager
    from plugtron.pipeline import build_model
    from plugtron.runtime.parallel import initialize_parallel

    from .importer import TOKENIZER_FILES, set_layout

    src = Path(src)
    meta = read_meta(src)
    pm = pm or get_plugin_manager()
    config = load_config(src / CONFIG_FILE, pm)
    set_layout(config, tp, pp, vp, str(config.params_dtype).removeprefix("torch."))
    keep_padding(config, int(meta["padded_vocab_size"]), tp)
    config.finalize()
    parallel = parallel or initialize_parallel(tp, pp, vp)
    weights = str(src / WEIGHTS_DIR)
    options = BuildOptions(meta_device=True, load_weights=lambda chunk, context: _load_chunk(chunk, weights))
    built = build_model(config, parallel=parallel, options=options, pm=pm)
    tokenizer = [src / name for name in TOKENIZER_FILES if (src / name).is_file()]
    return LoadedModel(built, config, meta, tokenizer)


def _load_chunk(chunk: Any, weights: str) -> None:
    """dist_checkpointing reads this chunk's shards (a collective: every rank has as many chunks)."""
    from megatron.core import dist_checkpointing

    from plugtron.sharding import unwrap

    inner = unwrap(chunk)
    loaded = dist_checkpointing.load({"chunk": inner.sharded_state_dict()}, weights)
    inner.load_state_dict(loaded["chunk"], strict=True)
