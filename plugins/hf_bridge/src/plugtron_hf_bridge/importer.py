"""HF safetensors checkpoint -> megatron-core model, each rank reading only its own slices.

Two phases, so that a bad checkpoint fails before any weight is written:

1. :func:`plan_import` (no process group needed; the CLI runs it before
   starting ranks): read ``config.json``, find the adapter through
   ``pm.converter("hf", architecture)``, translate the config, validate every
   safetensors header, and check the tensor table against the checkpoint:
   missing tensors, unused tensors, wrong shapes and non-floating dtypes are
   reported all at once, in one error (:func:`.preflight.check_table`). Side
   files to copy along must be regular files inside the source directory.
2. :func:`import_hf`: build through the shared pipeline on the meta device
   with a ``load_weights`` hook (:class:`ShardLoader`) that reads, per
   parameter, only the rows/columns this rank holds: whole query groups of
   ``linear_qkv``, ``[gate_r; up_r]`` of ``linear_fc1``, its vocab rows (padding
   zero-filled), and under PP/VP only its own layers. No rank ever holds the
   full state dict. Afterwards every rank checks that the ranks together
   filled every tensor of the table.

Routed experts (MoE) follow the expert layout (:mod:`plugtron.sharding`): a
rank's ``local_experts.{j}`` is global expert ``ep_rank x local + j`` (the
table's names are global), and an expert is split over the expert
tensor-parallel group, not the tensor-parallel one. The table has one mapping
per expert, so a rank reads only its own experts' bytes; the loader counts
the bytes it reads (:attr:`ImportedModel.reads`), routed experts apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import attrs

from .adapter import HFAdapter, load_adapter
from .errors import TensorSetError, UnsupportedConfigError
from .hf_config import architecture_from, read_hf_config
from .preflight import DTYPES, check_dtype_name, check_table, stored_dtype  # noqa: F401 - DTYPES re-exported

if TYPE_CHECKING:
    import torch

    from plugtron.manager import PlugtronPluginManager
    from plugtron.pipeline import BuiltModel

    from plugtron.conversion import TensorMapping

EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
#: Files a tokenizer (and generation) needs; copied along when the source has them.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)


@attrs.define
class ImportPlan:
    """Everything known about a conversion before any rank builds anything."""

    source: Path
    hf_config: dict[str, Any]
    architecture: str
    adapter: HFAdapter
    config: Any
    dtype_name: str
    unused: list[str]
    tokenizer_files: list[str]
    #: the checkpoint's :class:`.quantization.Scheme` (dequantised on import), None when not quantised
    quantization: Any = None


@attrs.define
class ImportedModel:
    built: "BuiltModel"
    plan: ImportPlan
    #: per global rank: ``{"rank", "bytes", "expert_bytes"}`` read from the checkpoint (every rank has all)
    reads: list[dict[str, int]] = attrs.Factory(list)


def torch_dtype(name: str) -> "torch.dtype":
    """``"bfloat16"`` -> ``torch.bfloat16``; anything but float32/bfloat16/float16 is an error."""
    check_dtype_name(name)
    import torch

    return getattr(torch, name)


def identify_source(src: str | Path, dtype: str | None,
                    pm: "PlugtronPluginManager | None") -> tuple[Path, dict[str, Any], str, str, HFAdapter]:
    """The first checks of an HF checkpoint, shared by the plan and the launcher's torch-free preflight:
    (directory, config.json, its path for messages, architecture, adapter)."""
    check_dtype_name(dtype)
    source = Path(src)
    hf_config = read_hf_config(source)
    where = str(source / "config.json")
    arch = architecture_from(hf_config, where, pm)
    return source, hf_config, where, arch, load_adapter(arch, pm)


def plan_import(src: str | Path, *, tp: int = 1, pp: int = 1, vp: int | None = None, dtype: str | None = None,
                pm: "PlugtronPluginManager | None" = None, ep: int = 1, etp: int | None = None) -> ImportPlan:
    """Validate ``src`` completely and describe the conversion (phase 1)."""
    from .quantization import scheme_of
    from .safetensors_io import SafetensorsCheckpoint

    source, hf_config, where, arch, adapter = identify_source(src, dtype, pm)
    config = adapter.config_from_hf(hf_config, source=where)
    scheme = scheme_of(hf_config, where)  # the architecture accepted the key; the engine must read the method
    tokenizer = side_files(source)
    with SafetensorsCheckpoint(source) as ckpt:
        dtype_name = dtype or stored_dtype(ckpt, source, scheme is not None)
        stored_mtp = getattr(adapter, "stored_mtp_layers", None)  # MTP layers stored after the decoder's
        if stored_mtp is not None and getattr(config, "mtp_num_layers", None) is None:
            config.mtp_num_layers = stored_mtp(ckpt.names(), config) or None
        set_layout(config, tp, pp, vp, dtype_name, ep=ep, etp=etp)
        config.finalize()
        mappings = adapter.tensor_mappings(config)
        unused = check_table(ckpt, mappings, lambda name: adapter.tolerated_unused(name, config), dtype_name, arch,
                             scheme)
    return ImportPlan(source, hf_config, arch, adapter, config, dtype_name, unused, tokenizer, scheme)


def side_files(source: Path) -> list[str]:
    """The :data:`TOKENIZER_FILES` present in ``source``, each a regular file inside it.

    They are copied into the output later, so a link out of the directory
    (``tokenizer.json -> /etc/passwd``) would copy whatever the checkpoint's
    author chose from this machine: it is refused by name now, before anything is written.
    """
    from plugtron.untrusted import regular_file_inside

    from .errors import checkpoint_errors

    with checkpoint_errors():
        return [name for name in TOKENIZER_FILES if regular_file_inside(source, name, required=False)]


def set_layout(config: Any, tp: int, pp: int, vp: int | None, dtype_name: str, *, ep: int = 1,
               etp: int | None = None) -> None:
    """Parallel layout and parameter dtype; bf16/fp16 also switch megatron's mixed-precision flags.

    ``ep`` / ``etp`` (expert model- and tensor-parallel sizes; ``etp`` defaults
    to ``tp``, megatron's rule) apply to MoE models only; asking a dense model
    for them is an error rather than a silently ignored flag.
    """
    if getattr(config, "num_moe_experts", None):
        config.expert_model_parallel_size = ep
        config.expert_tensor_parallel_size = etp
    elif ep != 1 or etp is not None:
        from .errors import ConversionError

        raise ConversionError(f"expert parallelism (ep={ep}, etp={etp}) applies to Mixture-of-Experts models only")
    config.tensor_model_parallel_size = tp
    config.pipeline_model_parallel_size = pp
    config.virtual_pipeline_model_parallel_size = vp
    dtype = torch_dtype(dtype_name)  # set, never read back: reading builds megatron's config early
    config.params_dtype = dtype
    config.bf16 = dtype_name == "bfloat16"
    config.fp16 = dtype_name == "float16"
    config.pipeline_dtype = dtype if pp > 1 else None


def import_hf(src: str | Path, *, tp: int = 1, pp: int = 1, vp: int | None = None, dtype: str | None = None,
              pm: "PlugtronPluginManager | None" = None, parallel: Any = None, progress: bool = False,
              plan: ImportPlan | None = None, pre_wrap_hooks: Sequence[Any] = (),
              post_wrap_hooks: Sequence[Any] = (), ep: int | None = None, etp: int | None = None) -> ImportedModel:
    """Plan (unless ``plan``, made for the same arguments, is given), then build the model with this rank's
    slices loaded (phase 2).

    ``pre_wrap_hooks`` / ``post_wrap_hooks`` go to :func:`plugtron.pipeline.build_model` (same order
    guarantees); pre-wrap hooks see the chunks before the weights are loaded (they are still on the meta
    device), post-wrap hooks the loaded, wrapped model. ``ep`` / ``etp``: the expert layout (default: the
    ``parallel`` context's, else 1 and ``tp``).
    """
    from plugtron.manager import get_plugin_manager

    from .libraries import collections_paused

    pm = pm or get_plugin_manager()
    with collections_paused():
        return _import(src, (tp, pp, vp) + expert_layout(ep, etp, tp, parallel), dtype, pm, parallel, progress, plan,
                       (pre_wrap_hooks, post_wrap_hooks))


def expert_layout(ep: int | None, etp: int | None, tp: int, parallel: Any) -> tuple[int, int | None]:
    """(ep, etp) asked for, else the ones of an existing parallel context (its etp only where it differs from tp)."""
    if parallel is not None:
        ep = ep or parallel.ep
        etp = etp or (parallel.etp if parallel.etp != parallel.tp else None)
    return ep or 1, etp


def _import(src: str | Path, layout: tuple, dtype: str | None, pm: Any, parallel: Any,
            progress: bool, plan: ImportPlan | None, hooks: tuple[Sequence[Any], Sequence[Any]]) -> ImportedModel:
    from plugtron.builder import BuildOptions
    from plugtron.pipeline import build_model
    from plugtron.runtime.parallel import initialize_parallel

    from .safetensors_io import SafetensorsCheckpoint

    tp, pp, vp, ep, etp = layout
    plan = plan or plan_import(src, tp=tp, pp=pp, vp=vp, dtype=dtype, pm=pm, ep=ep, etp=etp)
    parallel = parallel or initialize_parallel(tp, pp, vp, ep=ep, etp=etp)
    with SafetensorsCheckpoint(plan.source) as ckpt:
        loader = ShardLoader(plan, ckpt, parallel, progress)
        try:
            # meta build: the pipeline skips megatron's CPU init (plugtron.pipeline.stages), the loader fills every weight
            built = build_model(plan.config, parallel=parallel, options=BuildOptions(meta_device=True, load_weights=loader), pm=pm,
                                pre_wrap_hooks=hooks[0], post_wrap_hooks=hooks[1])
        finally:
            loader.reader.close()
    reads = loader.check_coverage()
    return ImportedModel(built, plan, reads)


class ShardLoader:
    """The ``load_weights`` hook: fills one materialised chunk with this rank's slices."""

    def __init__(self, plan: ImportPlan, ckpt: Any, parallel: Any, progress: bool) -> None:
        from .quantization import reader

        self.plan, self.parallel, self.progress = plan, parallel, progress
        self.reader = reader(ckpt, plan.quantization)  # FP8 weights dequantised on the way (scale rows r // block)
        self.filled: set[str] = set()
        self.expert_bytes = 0
        self._tables: dict[bool, dict[str, Any]] = {}

    def table(self, fused: bool) -> dict[str, "TensorMapping"]:
        """megatron name -> mapping, for the norm naming of the layer spec actually built."""
        if fused not in self._tables:
            maps = self.plan.adapter.tensor_mappings(self.plan.config, te_fused_norms=fused)
            self._tables[fused] = {m.megatron_name: m for m in maps}
        return self._tables[fused]

    def __call__(self, chunk: Any, context: Any) -> None:
        from plugtron.sharding import is_expert_name, layer_offset, unwrap

        inner = unwrap(chunk)
        self.builder = context.builder  # knows the family's TP block layouts (tp_row_blocks)
        jobs = self._jobs(inner, layer_offset(inner))
        show = self.progress and self.parallel.rank == 0
        with plain_torch():
            for name, param, mapping in _progress(jobs, show, "import"):
                before = self.reader.bytes_read
                self._fill(name, param, mapping)
                if is_expert_name(name):
                    self.expert_bytes += self.reader.bytes_read - before
                self.filled.add(mapping.megatron_name)

    def _jobs(self, inner: Any, offset: int) -> list[tuple[str, Any, "TensorMapping"]]:
        """Resolve every parameter to its mapping first: an unmapped one fails before any read.

        Names are the table's: global layers, and global expert indices for routed experts
        (a rank's ``local_experts.{j}`` is expert ``ep_rank x local + j``).
        """
        from plugtron.sharding import model_global_name as global_name

        config = self.plan.config
        params = [(global_name(n, offset, config), p) for n, p in inner.named_parameters()]
        table = self.table(any(n.endswith("layer_norm_weight") for n, _ in params))
        # persistent buffers the table maps (a router's expert_bias): loaded like parameters
        buffers = ((global_name(n, offset, config), b) for n, b in inner.named_buffers())
        params += [(n, b) for n, b in buffers if n in table]
        tied = config.share_embeddings_and_output_weights
        jobs, missing, wrong = [], [], []
        for name, param in params:
            mapping = table.get(EMBEDDING if tied and name == OUTPUT else name)
            if mapping is None:
                missing.append(name)
                continue
            expected = self._local_shape(name, param, mapping.megatron_shape)
            if tuple(param.shape) != expected:
                wrong.append(f"{name} {tuple(param.shape)} != {expected}")
            jobs.append((name, param, mapping))
        error = TensorSetError.combined("the model built", {"megatron parameters that no HF tensor maps to": missing,
                                                            "megatron parameter shapes differ from the tensor table": wrong})
        if error is not None:
            raise error
        return jobs

    def _local_shape(self, name: str, param: Any, full: tuple[int, ...]) -> tuple[int, ...]:
        dim, ranges = self._ranges(name, param, full)
        shape = list(full)
        if shape:
            shape[dim] = sum(stop - start for start, stop in ranges)
        return tuple(shape)

    def _ranges(self, name: str, param: Any, full: tuple[int, ...]) -> tuple[int, list[tuple[int, int]]]:
        """Rows (or columns) this rank holds: of its tensor-parallel group, or for routed experts its
        expert tensor-parallel group (:func:`plugtron.sharding.shard_group`)."""
        from plugtron.sharding import local_row_ranges, partition_dim, shard_group

        _, tp, rank = shard_group(name)
        if tp == 1 or not getattr(param, "tensor_model_parallel", False):
            return 0, [(0, full[0] if full else 1)]
        dim = partition_dim(param)
        return dim, local_row_ranges(full[dim], tp, rank, self.builder.tp_row_blocks(name, param))

    def _fill(self, name: str, param: Any, mapping: "TensorMapping") -> None:
        dim, ranges = self._ranges(name, param, mapping.megatron_shape)
        if mapping.pieces is None:
            self._fill_whole(name, param, mapping)
            return
        offset = 0
        for start, stop in ranges:
            if dim == 0:
                for piece, first, count, at in _split_rows(mapping.pieces, start, stop):
                    self._rows(piece, first, count, param.narrow(0, offset + at, count))
            else:
                target = param.narrow(dim, offset, stop - start)
                for piece, first, count, at in _split_rows(mapping.pieces, 0, mapping.megatron_shape[0]):
                    self._columns(piece, first, count, (start, stop), target.narrow(0, at, count))
            offset += stop - start

    def _rows(self, piece: Any, first: int, count: int, out: "torch.Tensor") -> None:
        if piece.hf_name is None:
            out.zero_()
        elif piece.transposed:
            rows = self.reader.checkpoint.shape(piece.hf_name)[0]
            self.reader.read_into(piece.hf_name, out, (0, rows), (piece.start + first, piece.start + first + count), transpose=True)
        else:
            self.reader.read_into(piece.hf_name, out, (piece.start + first, piece.start + first + count))

    def _columns(self, piece: Any, first: int, count: int, cols: tuple[int, int], out: "torch.Tensor") -> None:
        lo = piece.start + first
        if piece.hf_name is None:
            out.zero_()
        elif piece.transposed:
            self.reader.read_into(piece.hf_name, out, cols, (lo, lo + count), transpose=True)
        else:
            self.reader.read_into(piece.hf_name, out, (lo, lo + count), cols)

    def _fill_whole(self, name: str, param: Any, mapping: "TensorMapping") -> None:
        """Adapters without a row layout: build the full tensor, keep this rank's slice."""
        from plugtron.sharding import shard_group, tp_slice

        full = mapping.to_megatron([self.reader.read(n) for n in mapping.hf_names])
        blocks = self.builder.tp_row_blocks(name, param)
        _, size, rank = shard_group(name)
        param.copy_(tp_slice(full, param, rank, size, blocks=blocks))

    def check_coverage(self) -> list[dict[str, int]]:
        """All ranks together must have filled every tensor of the table (collective); returns each rank's reads."""
        import torch.distributed as dist

        gathered: list[Any] = [None] * dist.get_world_size()
        mine = {"rank": dist.get_rank(), "bytes": self.reader.bytes_read, "expert_bytes": self.expert_bytes}
        dist.all_gather_object(gathered, (sorted(self.filled), mine))
        filled = set().union(*(names for names, _ in gathered))
        fused = next(iter(self._tables), False)
        never = [n for m in self.table(fused).values() if m.megatron_name not in filled for n in m.hf_names]
        if never:
            raise TensorSetError("HF tensors no rank loaded (the model has no parameter for them)", never)
        return [reads for _, reads in gathered]


def plain_torch() -> Any:
    """Skip plugtron's CPU device-mapping torch function mode around pure CPU copy loops.

    The mode (active only on machines without CUDA) routes every torch call
    through Python to rewrite ``device="cuda"``; the copy loops here name no
    device, and the detour cost ~40 us per call (about a third of a 250M
    model's import). Elsewhere it is a no-op context.
    """
    import contextlib

    import torch

    from plugtron.runtime import cpu

    return torch._C.DisableTorchFunction() if cpu.is_enabled() else contextlib.nullcontext()


def _split_rows(pieces: Any, start: int, stop: int) -> Any:
    from plugtron.conversion.pieces import split_rows

    return split_rows(pieces, start, stop)


def _progress(items: list, show: bool, desc: str) -> Any:
    if not show:
        return items
    from .progress import progress

    return progress(items, desc)
