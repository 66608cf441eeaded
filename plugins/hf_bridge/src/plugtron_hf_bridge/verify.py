"""Logit parity: the transformers model and the converted plugtron model on the same batch.

The HF side is the adapter's transformers class loaded from the same
directory (safetensors only); the plugtron side is :func:`.importer.import_hf`
at the requested TP/PP layout, run through megatron's own pipeline schedule
(forward only), its vocab-parallel logits gathered over tensor parallelism
and sent to rank 0. Padding columns are cut off before comparing.

Both sides run in float32 by default, which makes the comparison a check of
the conversion rather than of bf16 rounding: max abs difference, cosine
similarity and top-1 agreement are reported; the run fails when the max abs
difference exceeds the tolerance (1e-4 for float32).

In bfloat16/float16 a fixed logits tolerance would be a guess: rounding noise
grows with the logit scale and the depth. So the plugtron model is compared
with transformers *in float32* (the truth), and transformers' own run in the
same low precision measures the noise that precision brings: the check passes
when plugtron is at most ``LOW_PRECISION_MARGIN`` times as far from the truth
as transformers itself. Measured on tiny Llama, Mistral, Qwen2, Qwen3 and
GPT-2 checkpoints, plugtron's distance was 0.65-1.03 times transformers' own in
bf16 and fp16; a wrong conversion is orders of magnitude further away.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    import torch

#: Max abs logits difference allowed in float32 (and the floor in low precision).
FLOAT32_TOLERANCE = 1e-4
#: Low precision: allowed distance from transformers' float32 logits, in units of
#: transformers' own distance in that precision (see the module docstring).
LOW_PRECISION_MARGIN = 2.0


@attrs.define
class ParityReport:
    max_abs_diff: float
    cosine: float
    top1_agreement: float
    logit_scale: float
    tolerance: float
    tokens: int
    layout: str
    dtype: str
    #: Low precision only: transformers' own max abs distance from its float32 logits.
    reference_noise: float | None = None

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def sample_tokens(vocab_size: int, batch: int, seq: int, seed: int = 0) -> "torch.Tensor":
    import torch

    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def megatron_logits(built: Any, tokens: "torch.Tensor") -> "torch.Tensor | None":
    """Full-vocab (padded) float32 logits on global rank 0, ``None`` on the other ranks."""
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    chunks, builder = built.chunks, built.context.builder
    count = microbatches(built.context.parallel)
    device = built.context.device
    parts = tokens.to(device).chunk(count)
    seq = tokens.shape[1]
    batches = [{"tokens": p, "position_ids": torch.arange(seq, device=device).expand(p.shape[0], -1)} for p in parts]
    for chunk in chunks:
        chunk.eval()
    iterators = [iter(batches) for _ in chunks]
    with torch.no_grad():
        results = get_forward_backward_func()(
            forward_step_func=lambda iterator, model: (builder.forward_step(model, next(iterator)), None),
            data_iterator=iterators if len(chunks) > 1 else iterators[0],
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=count, seq_length=seq, micro_batch_size=parts[0].shape[0], forward_only=True,
        )
    local = torch.cat([r.float() for r in results]) if results else None
    return _to_rank0(_gather_vocab(local, built.context.parallel), built.context.parallel)


def microbatches(parallel: Any) -> int:
    """megatron's interleaved schedule needs at least PP micro-batches; the others take one."""
    return parallel.pp if parallel.vp else 1


def _gather_vocab(local: "torch.Tensor | None", parallel: Any) -> "torch.Tensor | None":
    """Vocab-parallel logits -> full vocab on every TP rank of the last stage."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    if local is None or parallel.tp == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(parallel.tp)]
    dist.all_gather(parts, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def _to_rank0(full: "torch.Tensor | None", parallel: Any) -> "torch.Tensor | None":
    import torch
    import torch.distributed as dist

    holder = full is not None and parallel.tp_rank == 0 and parallel.dp_rank == 0
    gathered: list[Any] = [None] * parallel.world_size
    dist.all_gather_object(gathered, (parallel.rank, tuple(full.shape)) if holder else None)
    source, shape = next(item for item in gathered if item is not None)
    if source == 0:
        return full.cpu() if parallel.rank == 0 else None
    if parallel.rank == source:
        dist.send(full.cpu().contiguous(), dst=0)
    elif parallel.rank == 0:
        full = torch.empty(shape)
        dist.recv(full, src=source)
        return full
    return None


def hf_logits(adapter: Any, src: str | Path, tokens: "torch.Tensor", dtype_name: str) -> "torch.Tensor":
    """Logits of the transformers model loaded from ``src`` (eager attention, safetensors only)."""
    import torch

    from plugtron.records import resolve

    cls = resolve(adapter.hf_model_class)
    model = cls.from_pretrained(str(src), dtype=getattr(torch, dtype_name), attn_implementation="eager",
                                use_safetensors=True, local_files_only=True).eval()
    with torch.no_grad():  # no KV cache: one full forward, and NemotronH without attention breaks with one
        return model(tokens, use_cache=False).logits.float()


def default_tolerance(dtype: str, reference_noise: float | None) -> float:
    """1e-4 in float32; in low precision ``LOW_PRECISION_MARGIN`` x transformers' own rounding noise."""
    if reference_noise is None:
        return FLOAT32_TOLERANCE
    return max(FLOAT32_TOLERANCE, LOW_PRECISION_MARGIN * reference_noise)


def compare(reference: "torch.Tensor", candidate: "torch.Tensor", tolerance: float, layout: str, dtype: str,
            reference_noise: float | None = None) -> ParityReport:
    import torch

    candidate = candidate[..., : reference.shape[-1]]
    diff = (reference - candidate).abs().max().item()
    cosine = torch.nn.functional.cosine_similarity(reference.flatten().double(), candidate.flatten().double(), dim=0).item()
    top1 = (reference.argmax(-1) == candidate.argmax(-1)).float().mean().item()
    return ParityReport(diff, cosine, top1, reference.abs().max().item(), tolerance,
                        reference.shape[0] * reference.shape[1], layout, dtype, reference_noise)


def verify(src: str | Path, *, tp: int = 1, pp: int = 1, vp: int | None = None, dtype: str = "float32",
           batch: int = 2, seq: int | None = None, tolerance: float | None = None, pm: Any = None,
           parallel: Any = None, imported: Any = None, progress: bool = False) -> ParityReport:
    """Import ``src`` at the layout, compare logits with transformers; every rank gets the report."""
    import torch.distributed as dist

    from .importer import import_hf

    imported = imported or import_hf(src, tp=tp, pp=pp, vp=vp, dtype=dtype, pm=pm, parallel=parallel, progress=progress)
    config, parallel = imported.plan.config, imported.built.context.parallel
    count = microbatches(parallel)
    tokens = sample_tokens(config.vocab_size, -(-batch // count) * count, seq or min(config.seq_length, 32))
    ours = megatron_logits(imported.built, tokens)
    report = None
    if parallel.rank == 0:
        adapter = imported.plan.adapter
        reference = hf_logits(adapter, src, tokens, "float32")
        noise = None
        if dtype != "float32":
            noise = (hf_logits(adapter, src, tokens, dtype) - reference).abs().max().item()
        layout = f"tp={parallel.tp} pp={parallel.pp}" + (f" vp={parallel.vp}" if parallel.vp else "")
        limit = default_tolerance(dtype, noise) if tolerance is None else tolerance
        report = compare(reference, ours, limit, layout, dtype, noise)
    box = [report]
    dist.broadcast_object_list(box, src=0)
    return box[0]
