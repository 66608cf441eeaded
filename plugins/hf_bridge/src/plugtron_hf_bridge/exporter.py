"""megatron-core model -> HF safetensors directory, one tensor at a time.

:func:`export_tensors` walks the adapter's tensor table in order on every
rank, in lockstep: the ranks holding a tensor send its tensor-parallel slices
to the first rank of their group (:func:`.export_rows.gather_rows`), that
owning rank sends the full tensor to rank 0 (pipeline stages other than the
first), and rank 0 cuts it into HF tensors (vocab padding cut off) and yields
them, as views wherever the row layout allows (:mod:`.export_rows`), until the
writer writes them into the current shard.

Routed experts go the same way, one expert at a time (the table has one
mapping per expert, so no layer's experts are ever stacked): the ranks of the
expert-parallel rank that holds the expert gather its slices over their expert
tensor-parallel group (:func:`plugtron.sharding.shard_group`) to the lowest of
them, which sends the full expert to rank 0.

:func:`write_hf` is rank 0's side: shards written by
:class:`~plugtron_hf_bridge.safetensors_io.ShardedSafetensorsWriter` into a
temporary directory that :func:`plugtron._atomic.atomic_output_dir`
renames into place only when everything, ``config.json`` and tokenizer files
included, was written. An exception or signal mid-stream leaves neither the
destination nor the temporary directory behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from .errors import CheckpointFormatError, TensorSetError
from .importer import OUTPUT, plain_torch

if TYPE_CHECKING:
    import torch

    from .adapter import HFAdapter

_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "B": 1}


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5e9 bytes (decimal units, as HF uses; KiB/MiB/GiB are binary)."""
    if isinstance(text, int):
        value = text
    else:
        raw = text.strip().upper().replace(" ", "")
        unit = next((u for u in sorted(_UNITS, key=len, reverse=True) if raw.endswith(u)), "")
        try:
            value = int(float(raw[: len(raw) - len(unit)]) * _UNITS.get(unit, 1))
        except ValueError:
            raise CheckpointFormatError(Path("."), f"max shard size {text!r} is not a size like 5GB or 500MB") from None
    if value <= 0:
        raise CheckpointFormatError(Path("."), f"max shard size {text!r} must be positive")
    return value


def refuse_existing(dst: str | Path, overwrite: bool, sources: Iterable[str | Path] = ()) -> None:
    """Fail early (on every rank alike) when the destination exists and may not be replaced,
    or overlaps a source (see :func:`plugtron._atomic.check_destination`)."""
    from plugtron._atomic import check_destination

    check_destination(dst, sources=sources, overwrite=overwrite)


def _local_params(chunks: list, config: Any) -> dict[str, Any]:
    """Global megatron name (layer and expert) -> this rank's parameter; a tied output layer is a copy, not a source."""
    from plugtron.sharding import layer_offset, model_global_name, unwrap

    tied = bool(config.share_embeddings_and_output_weights)
    params = {}
    for chunk in chunks:
        inner = unwrap(chunk)
        offset = layer_offset(inner)
        for local, param in [*inner.named_parameters(), *_persistent_buffers(inner)]:
            name = model_global_name(local, offset, config)
            if not (tied and name == OUTPUT):
                params[name] = param
    return params


def _persistent_buffers(module: Any) -> list[tuple[str, Any]]:
    """Buffers a checkpoint stores (a router's ``expert_bias``): exported like parameters where the table maps them."""
    saved = set(module.state_dict(keep_vars=True))
    return [(n, b) for n, b in module.named_buffers() if n in saved]


def _group_keys(parallel: Any) -> tuple[tuple, tuple]:
    """This rank's (dense, expert) group keys: ranks with equal keys hold slices of the same tensors.

    Dense tensors are split over tensor parallelism inside a (pp, dp) replica;
    routed experts over expert tensor parallelism inside a (pp, expert-dp, ep) one.
    """
    from megatron.core import parallel_state as ps

    return ((parallel.pp_rank, parallel.dp_rank),
            (parallel.pp_rank, "experts", ps.get_expert_data_parallel_rank(), ps.get_expert_model_parallel_rank()))


def _owners(params: dict[str, Any], parallel: Any) -> dict[str, tuple[int, tuple, str]]:
    """name -> (owning global rank, its group key, dtype), agreed by all ranks."""
    import torch.distributed as dist

    from plugtron.sharding import is_expert_name

    dense, expert = _group_keys(parallel)
    mine = (parallel.rank, {n: (expert if is_expert_name(n) else dense, str(p.dtype).removeprefix("torch."))
                            for n, p in params.items()})
    gathered: list[Any] = [None] * parallel.world_size
    dist.all_gather_object(gathered, mine)
    owners: dict[str, tuple[int, tuple, str]] = {}
    for rank, names in sorted(gathered, key=lambda item: item[0]):
        for name, (key, dtype) in names.items():
            owners.setdefault(name, (rank, key, dtype))
    return owners


def export_tensors(chunks: list, config: Any, adapter: "HFAdapter", parallel: Any, builder: Any,
                   dtype: "torch.dtype | None" = None) -> Iterator[tuple[str, "torch.Tensor"]]:
    """Yield ``(hf_name, tensor)`` on rank 0; other ranks yield nothing but must iterate too.

    ``builder`` gives the family's tensor-parallel block layouts (``tp_row_blocks``).
    """
    import torch
    import torch.distributed as dist

    from plugtron.sharding import is_expert_name, shard_group

    from .export_rows import as_tensor, gather_rows, hf_tensors

    params = _local_params(chunks, config)
    fused = any(n.endswith("layer_norm_weight") for n in params)
    mappings = adapter.tensor_mappings(config, te_fused_norms=fused)
    copies: dict[str, list[str]] = {}
    for copy, source in getattr(adapter, "hf_copies", lambda _: [])(config):
        copies.setdefault(source, []).append(copy)
    owners = _owners(params, parallel)
    absent = [m.megatron_name for m in mappings if m.megatron_name not in owners]
    if absent:
        raise TensorSetError("the model has no parameter for these tensors of the table", absent)
    dense, expert = _group_keys(parallel)
    for mapping in mappings:
        name = mapping.megatron_name
        owner, key, stored = owners[name]
        full = None
        if key == (expert if is_expert_name(name) else dense) and name in params:
            param = params[name]
            group, size, _ = shard_group(name)
            full = gather_rows(param.detach(), param, group, size, builder.tp_row_blocks(name, param))
        if owner != 0:
            if parallel.rank == owner:
                dist.send(as_tensor(full).contiguous().cpu(), dst=0)
            elif parallel.rank == 0:
                full = torch.empty(mapping.megatron_shape, dtype=getattr(torch, stored))
                dist.recv(full, src=owner)
        if parallel.rank == 0:
            for hf_name, tensor in hf_tensors(mapping, full, dtype):
                yield hf_name, tensor
                for copy in copies.get(hf_name, ()):  # stored twice in HF (MTP layers' embedding / head)
                    yield copy, tensor


def write_hf(dst: str | Path, tensors: Iterable[tuple[str, "torch.Tensor"]], hf_config: dict[str, Any] | str, *,
             extra_files: Iterable[Path] = (), max_shard_bytes: int = 5 * 10**9, overwrite: bool = False,
             total: int | None = None, progress: bool = False, overlap: bool = True) -> Path:
    """Write an HF checkpoint directory atomically (rank 0 only); ``hf_config``: a dict or the config.json text.

    ``overlap``: write each full shard in a background thread while ``tensors`` produces the next
    (:class:`~.safetensors_io.ShardedSafetensorsWriter`); worth it only where producing them costs something.
    """
    from plugtron._atomic import atomic_output_dir

    from .safetensors_io import ShardedSafetensorsWriter

    dst = Path(dst)
    with atomic_output_dir(dst, overwrite=overwrite) as tmp:
        with ShardedSafetensorsWriter(tmp, max_shard_bytes=max_shard_bytes, overlap=overlap) as writer:
            for name, tensor in _progress(tensors, progress, total):
                writer.add(name, tensor)
        (tmp / "config.json").write_text(hf_config if isinstance(hf_config, str) else config_json(hf_config))
        for path in extra_files:
            shutil.copy2(path, tmp / path.name)
    return dst


def export_hf(built: Any, config: Any, adapter: "HFAdapter", dst: str | Path, *, source_hf_config: dict | None = None,
              extra_files: Iterable[Path] = (), dtype: str | None = None, max_shard_bytes: int = 5 * 10**9,
              overwrite: bool = False, progress: bool = False) -> Path | None:
    """Export a built model (all ranks call it); returns the destination on rank 0."""
    from .libraries import collections_paused

    refuse_existing(dst, overwrite)
    with collections_paused():
        return _export(built, config, adapter, dst, source_hf_config, extra_files, dtype, max_shard_bytes, overwrite,
                       progress)


def _export(built: Any, config: Any, adapter: "HFAdapter", dst: str | Path, source_hf_config: dict | None,
            extra_files: Iterable[Path], dtype: str | None, max_shard_bytes: int, overwrite: bool,
            progress: bool) -> Path | None:
    import torch.distributed as dist

    from .importer import torch_dtype

    cast = torch_dtype(dtype) if dtype else None
    parallel = built.context.parallel
    tensors = export_tensors(built.chunks, config, adapter, parallel, built.context.builder, cast)
    if parallel.rank != 0:
        with plain_torch():
            for _ in tensors:
                pass
        dist.barrier()
        return None
    hf_config = config_text(adapter, config, source_hf_config, dtype or _dtype_name(config))
    total = (sum(len(m.hf_names) for m in adapter.tensor_mappings(config))
             + len(getattr(adapter, "hf_copies", lambda _: [])(config))) if progress else None
    try:
        with plain_torch():
            out = write_hf(dst, tensors, hf_config, extra_files=extra_files, max_shard_bytes=max_shard_bytes,
                           overwrite=overwrite, total=total, progress=progress,
                           overlap=_tensors_cost_work(parallel, cast))
    finally:
        tensors.close()
    dist.barrier()
    return out


def _tensors_cost_work(parallel: Any, cast: Any) -> bool:
    """Whether rank 0 works to produce the HF tensors (receives them from other ranks, casts them), so that
    writing one shard while producing the next gains time; alone and uncast, they are views of its model."""
    return parallel.world_size > 1 or cast is not None


def config_text(adapter: "HFAdapter", config: Any, source: dict | None, dtype_name: str) -> str:
    """The config.json to write: the source's own, when it still describes the model, else a generated one.

    Why: regenerating goes through transformers' config classes (1.5-3.5 s of
    imports here); a converted model whose megatron config still matches its
    source config.json (the adapter's ``describes``) gets that file back with
    only its dtype updated, which is also what its owner wrote. A quantised
    source's ``quantization_config`` is dropped: the weights written are the
    dequantised ones.
    """
    describes = getattr(adapter, "describes", None)
    if source is not None and describes is not None and describes(config, source):
        out = {key: value for key, value in source.items() if key != "quantization_config"}
        out["architectures"] = [adapter.architecture]
        _set_dtype(out, dtype_name)
        return json.dumps(out, indent=2, sort_keys=True) + "\n"
    return config_json(hf_config_for(adapter, config, source, dtype_name))


def _set_dtype(hf_config: dict[str, Any], dtype_name: str) -> None:
    hf_config["dtype"] = dtype_name
    if "torch_dtype" in hf_config:  # older files spell it this way; keep both consistent
        hf_config["torch_dtype"] = dtype_name


def hf_config_for(adapter: "HFAdapter", config: Any, source: dict | None, dtype_name: str) -> dict[str, Any]:
    """The adapter's config.json, keeping the source's token ids etc.; the dtype says what was written."""
    out = adapter.config_to_hf(config, passthrough=source)
    _set_dtype(out, dtype_name)
    return out


def config_json(hf_config: dict[str, Any]) -> str:
    """config.json text as ``save_pretrained`` writes it (only non-default keys), when
    transformers knows the model type; the plain dict otherwise (third-party adapters)."""
    try:
        from transformers import CONFIG_MAPPING

        return CONFIG_MAPPING[hf_config["model_type"]].from_dict(dict(hf_config)).to_json_string(use_diff=True)
    except Exception:  # noqa: BLE001 - unknown model type: write what the adapter produced
        return json.dumps(hf_config, indent=2, sort_keys=True) + "\n"


def _dtype_name(config: Any) -> str:
    return str(config.params_dtype).removeprefix("torch.")


def _progress(items: Iterable, show: bool, total: int | None) -> Iterable:
    if not show:
        return items
    from .progress import progress

    return progress(items, "export", total=total)
