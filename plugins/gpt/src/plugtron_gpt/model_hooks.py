"""Model-level variants: the embedding multiplier and the logit transforms, as forward hooks.

megatron's ``GPTModel`` computes the embedding and the logits inside
``forward``/``_postprocess`` with no place to add an operation, but it calls
its ``embedding`` and ``output_layer`` submodules for each: a forward hook on
those is the smallest change that keeps ``GPTModel`` itself (its class, its
parameter names, its pipeline and MTP logic). The hooks act on every call:

* ``embedding``: the main input and the MTP layers' re-embedding of the
  shifted tokens (pre-process and MTP stages). An externally supplied
  ``decoder_input`` is not scaled (HF scales inside ``embed_tokens``, not
  ``inputs_embeds``). Under sequence parallelism the output is the rank's
  sequence slice; the multiply is elementwise.
* ``output_layer``: the main head and every MTP head (last stage); logits
  are vocab-sharded at TP > 1 and both transforms are elementwise. The
  loss is computed from the transformed logits, as HF computes it.

Hooks are kept by ``deepcopy``, meta-device materialisation and the DDP /
Float16Module / FSDP2 wrappers (they wrap the model, not these modules).
"""

from __future__ import annotations

from typing import Any

import torch


class EmbeddingMultiplier:
    """``output * multiplier``; with ``cast`` the multiplier is a float32 scalar cast to the output dtype first.

    Gemma keeps ``sqrt(hidden_size)`` as a float32 buffer and casts it to the
    weight dtype before multiplying (in bf16, 45.25... becomes 45.25); Granite
    multiplies by the Python float (torch's opmath: exact in float32, rounded
    once in bf16). The two agree in float32.
    """

    def __init__(self, multiplier: float, cast: bool) -> None:
        self.multiplier, self.cast = multiplier, cast

    def __call__(self, module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        if self.cast:
            return output * torch.tensor(self.multiplier, dtype=torch.float32).to(device=output.device, dtype=output.dtype)
        return output * self.multiplier


class LogitsTransform:
    """``logits / divisor`` (Granite), then ``cap * tanh(logits / cap)`` (Gemma-2/3), in the logits dtype."""

    def __init__(self, divisor: float | None, softcap: float | None) -> None:
        self.divisor, self.softcap = divisor, softcap

    def __call__(self, module: torch.nn.Module, args: Any, output: tuple[torch.Tensor, Any]) -> tuple[torch.Tensor, Any]:
        logits, bias = output
        if self.divisor is not None:
            logits = logits / self.divisor
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits, bias


def install(model: torch.nn.Module, config: Any) -> None:
    """Register the hooks ``config`` asks for on one GPT stage (nothing when no variant is set)."""
    embedding = getattr(model, "embedding", None)
    if config.embedding_multiplier is not None and embedding is not None:
        embedding.register_forward_hook(EmbeddingMultiplier(config.embedding_multiplier, config.embedding_multiplier_cast))
    output_layer = getattr(model, "output_layer", None)
    if (config.logits_divisor is not None or config.final_logit_softcap is not None) and output_layer is not None:
        output_layer.register_forward_hook(LogitsTransform(config.logits_divisor, config.final_logit_softcap))
