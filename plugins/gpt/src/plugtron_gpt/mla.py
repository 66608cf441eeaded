"""What a Multi-Latent Attention stage needs after megatron has constructed it.

* **Initialisation of the replicated down projections.** megatron's
  replicated ``Linear`` (the class MLA accepts for ``linear_q_down_proj`` /
  ``linear_kv_down_proj`` without transformer-engine) is a ``torch.nn.Linear``
  and keeps torch's default (Kaiming-uniform) initialisation, ignoring
  ``config.init_method``, which transformer-engine's ``TELinear`` honours.
  Eagerly built weights are re-drawn with ``init_method`` here, so an eager
  build, a meta build (materialised with ``init_method``) and a GPU build agree.
  Every tensor-parallel rank draws the same values: megatron draws CPU-initialised
  weights from the default generator in the same order on every rank.
* **Where the rotary frequencies are.** MLA applies RoPE inside each
  attention layer (each owns a rotary module) and ``GPTModel`` builds none.
  ``model.rotary_pos_emb`` is made an *unregistered* alias of the first
  layer's, so code that inspects a model's rotary frequencies (meta-build
  checks, converters) finds them where it does for every other GPT; it is not
  a submodule (no duplicate state-dict entries) and ``GPTModel.forward`` never
  reads it for MLA.
"""

from __future__ import annotations

from typing import Any

import torch


def replicated_down_projections(model: torch.nn.Module) -> list[torch.nn.Module]:
    from plugtron_gpt.specs import replicated_linear

    linear = replicated_linear()
    return [m for m in model.modules() if type(m) is linear]


def finish_stage(model: torch.nn.Module, config: Any) -> None:
    meta = any(p.is_meta for p in model.parameters())
    if not meta and config.perform_initialization:
        with torch.no_grad():
            for module in replicated_down_projections(model):
                config.init_method(module.weight)
                if module.bias is not None:
                    module.bias.zero_()
    rotary = next((m.rotary_pos_emb for m in model.modules() if hasattr(m, "linear_kv_down_proj")), None)
    if rotary is not None and "rotary_pos_emb" not in model._modules:
        object.__setattr__(model, "rotary_pos_emb", rotary)
