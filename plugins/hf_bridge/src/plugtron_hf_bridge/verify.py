"""Logit parity: the transformers model and the converted plugtron model on the same batch.

The HF side is the adapter's transformers class loaded from the same
directory (safetensors only); the plugtron side is :func:`.importer.import_hf`
at the requested TP/PP layout, run through megatron's own pipeline schedule
(forward only), its vocab-parallel logits gathered over tensor parallelism
and sent to rank 0. Padding columns are cut off before comparing.

A fixed logits tolerance would be a guess in any precision: rounding noise
grows with the logit scale and the depth. A fixed 1e-4 in float32 failed a
correct conversion of Qwen2.5-0.5B (24 layers): plugtron was 1.6e-4 from
transformers, whose own float32 logits were 2.0e-4 from its float64 logits.
So every dtype is judged the same way. The plugtron model runs in ``dtype``
and is compared with transformers one precision up (the *truth*: float64 for
float32, float32 for bfloat16/float16); transformers' own run in ``dtype``
measures the noise that precision brings (``reference_noise``). The check
passes when plugtron is at most ``NOISE_MARGIN`` times as far from the truth
as transformers itself, and never fails below ``TOLERANCE_FLOOR``: the old
fixed float32 bound, so nothing that passed before fails now, and room for
tiny models, whose float32 noise is near 1e-7 while a reduction order that
TP changes may legitimately move logits by a few 1e-6.

A correct conversion rounds differently from transformers but no worse, so
its distance from the truth is about transformers' own; a max over tokens
scatters, and plugtron measured 0.65-1.3 times transformers' own (float32,
bf16 and fp16 on tiny Llama, Mistral, Qwen2, Qwen3, GPT-2; float32 at
Qwen2.5-0.5B's shape with random weights: 5.1e-4 against 5.9e-4), hence a
margin of 2. Wrong
conversions at that shape stay far beyond the bound of 1.2e-3: a wrong norm
epsilon 2.6e-2, a query and a key head swapped 1.2, a wrong RoPE base 26
(tests/hf_bridge/test_hfb_verify_bound.py).

Mixture-of-Experts models in bfloat16/float16 can exceed the bound at one
token: a router choice that is nearly a tie rounds one way in transformers
and the other way here, and that token's logits move by several times the
noise (measured on tiny random Qwen3-MoE cases: one token at 2.6x and 4.9x
transformers' own bf16 distance, every other token within it; float32 parity
5e-7). Verify MoE conversions in float32.

Cost: rank 0 loads the transformers model twice, one after the other, and
runs one forward each on the small verify batch (default 2 x 32 tokens). In
float32 the truth is a float64 copy, so for that moment rank 0 holds twice
the float32 model's bytes in host memory (previously once) and pays a float64
CPU forward. An explicit ``tolerance`` replaces the bound but not the
measurement, so every report carries the same numbers.
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import attrs

if TYPE_CHECKING:
    import torch

#: Max abs logits difference that always passes, whatever the measured noise.
TOLERANCE_FLOOR = 1e-4
#: Allowed distance from the truth, in units of transformers' own distance in
#: the same precision (see the module docstring).
NOISE_MARGIN = 2.0
#: The precision one step up from each verify dtype: the truth both sides are measured against.
TRUTH_DTYPE = {"float32": "float64", "bfloat16": "float32", "float16": "float32", "float64": "float64"}
#: Former names, kept for callers written against them.
FLOAT32_TOLERANCE, LOW_PRECISION_MARGIN = TOLERANCE_FLOOR, NOISE_MARGIN


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
    #: transformers' own max abs distance in ``dtype`` from its ``reference_dtype`` logits
    #: (``None`` when the truth could not be run; the bound is then the floor).
    reference_noise: float | None = None
    #: The precision of the transformers logits that ``max_abs_diff`` is measured from.
    reference_dtype: str = "float32"

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
    """Logits of the transformers model loaded from ``src`` (eager attention, safetensors only).

    Returned in float64 so that a float64 run keeps the digits it is the truth for.
    The model is dropped on return: two calls in a row never hold two models.
    In float64 the experts of MoE models run one by one (``experts_implementation="eager"``):
    transformers' default grouped matmul refuses float64, which left MoE models without a
    truth (measured: eager and grouped agree to 2.4e-7 in float32 on the tiny MoE cases).
    """
    import torch

    from plugtron.records import resolve

    cls = resolve(adapter.hf_model_class)
    extra = {"experts_implementation": "eager"} if dtype_name == "float64" else {}
    model = cls.from_pretrained(str(src), dtype=getattr(torch, dtype_name), attn_implementation="eager",
                                use_safetensors=True, local_files_only=True, **extra).eval()
    with torch.no_grad():  # no KV cache: one full forward, and NemotronH without attention breaks with one
        return model(tokens, use_cache=False).logits.double()


def reference_logits(adapter: Any, src: str | Path, tokens: "torch.Tensor",
                     dtype: str) -> "tuple[torch.Tensor, str, float | None]":
    """(truth logits, their dtype, transformers' own max abs distance from them in ``dtype``).

    The truth is one precision above ``dtype``. A model class that cannot run
    in float64 (a custom kernel, say) falls back to float32 as the truth with
    no noise measured, so its bound is the fixed floor, as before.
    """
    truth = TRUTH_DTYPE.get(dtype, "float32")
    try:
        reference = hf_logits(adapter, src, tokens, truth)
    except (RuntimeError, NotImplementedError) as error:
        if dtype != "float32":  # only float32 has a truth (float64) that a model class may lack
            raise
        warnings.warn(f"transformers cannot run {adapter.hf_model_class} in {truth} ({error}); "
                      f"judging {dtype} parity by the fixed bound {TOLERANCE_FLOOR:g}", stacklevel=2)
        return hf_logits(adapter, src, tokens, dtype), dtype, None
    if truth == dtype:
        return reference, truth, 0.0
    own = hf_logits(adapter, src, tokens, dtype)
    return reference, truth, (own - reference).abs().max().item()


@contextlib.contextmanager
def reference_source(src: str | Path, hf_config: dict[str, Any]) -> Iterator[Path]:
    """The checkpoint transformers is run on: ``src``, or for a quantised one a float32 dequantised copy.

    transformers 5.23 loads FP8 checkpoints only with ``accelerate`` and, on CPU,
    only when every side is a multiple of the block; the copy holds exactly the
    values plugtron imported (``quantization.write_dequantized``), in a private
    temporary folder removed afterwards. It takes four bytes per parameter of disk.
    """
    from .quantization import scheme_of, write_dequantized

    if scheme_of(hf_config) is None:
        yield Path(src)
        return
    with tempfile.TemporaryDirectory(prefix="plugtron-verify-") as tmp:
        yield write_dequantized(src, Path(tmp) / "dequantized", "float32")


def default_tolerance(dtype: str, reference_noise: float | None) -> float:
    """``NOISE_MARGIN`` x transformers' own rounding noise in ``dtype``, never below the floor.

    ``dtype`` is unused: the same rule holds in every precision; it stays for callers.
    """
    if reference_noise is None:
        return TOLERANCE_FLOOR
    return max(TOLERANCE_FLOOR, NOISE_MARGIN * reference_noise)


def compare(reference: "torch.Tensor", candidate: "torch.Tensor", tolerance: float, layout: str, dtype: str,
            reference_noise: float | None = None, reference_dtype: str = "float32") -> ParityReport:
    import torch

    reference = reference.double()
    candidate = candidate[..., : reference.shape[-1]].double()
    diff = (reference - candidate).abs().max().item()
    cosine = torch.nn.functional.cosine_similarity(reference.flatten(), candidate.flatten(), dim=0).item()
    top1 = (reference.argmax(-1) == candidate.argmax(-1)).float().mean().item()
    return ParityReport(diff, cosine, top1, reference.abs().max().item(), tolerance,
                        reference.shape[0] * reference.shape[1], layout, dtype, reference_noise, reference_dtype)


def layout_text(parallel: Any, config: Any) -> str:
    """``tp=2 pp=1``, plus ``vp=`` when interleaved and ``ep= etp=`` for a MoE model."""
    text = f"tp={parallel.tp} pp={parallel.pp}" + (f" vp={parallel.vp}" if parallel.vp else "")
    if getattr(config, "num_moe_experts", None):
        text += f" ep={parallel.ep} etp={parallel.etp}"
    return text


def verify(src: str | Path, *, tp: int = 1, pp: int = 1, vp: int | None = None, dtype: str = "float32",
           batch: int = 2, seq: int | None = None, tolerance: float | None = None, pm: Any = None,
           parallel: Any = None, imported: Any = None, progress: bool = False, ep: int | None = None,
           etp: int | None = None) -> ParityReport:
    """Import ``src`` at the layout (``ep`` / ``etp``: MoE expert layout), compare logits with transformers;
    every rank gets the report."""
    import torch.distributed as dist

    from .importer import import_hf

    imported = imported or import_hf(src, tp=tp, pp=pp, vp=vp, dtype=dtype, pm=pm, parallel=parallel,
                                     progress=progress, ep=ep, etp=etp)
    config, parallel = imported.plan.config, imported.built.context.parallel
    count = microbatches(parallel)
    tokens = sample_tokens(config.vocab_size, -(-batch // count) * count, seq or min(config.seq_length, 32))
    ours = megatron_logits(imported.built, tokens)
    report = None
    if parallel.rank == 0:
        with reference_source(src, imported.plan.hf_config) as plain:
            reference, truth, noise = reference_logits(imported.plan.adapter, plain, tokens, dtype)
        layout = layout_text(parallel, config)
        limit = default_tolerance(dtype, noise) if tolerance is None else tolerance
        report = compare(reference, ours, limit, layout, dtype, noise, truth)
    box = [report]
    dist.broadcast_object_list(box, src=0)
    return box[0]
