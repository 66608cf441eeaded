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
* **YaRN caches computed once per build.** Each MLA layer owns a YaRN rotary
  module that computes its cos/sin caches at construction (real tensors, even
  under a meta build): 62 identical computations for a DeepSeek-V3 shape,
  ~1 s of its construction. :func:`yarn_caches_computed_once` computes each
  distinct cache once and gives every later layer a *copy* (never the same
  tensor: shared buffers are deduplicated by ``named_buffers``, which
  materialisation relies on).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

#: What a YaRN module's cos/sin caches depend on, besides the arguments of ``_set_cos_sin_cache``.
_YARN_KEY = (
    "dim", "rotary_base", "scaling_factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
    "mscale", "mscale_all_dim", "correction_range_round_to_int", "rotary_interleaved",
)


@contextlib.contextmanager
def yarn_caches_computed_once() -> Iterator[None]:
    """While constructing, YaRN modules with the same settings copy the first one's cos/sin caches."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding

    original = YarnRotaryEmbedding._set_cos_sin_cache
    made: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def set_cache(self: Any, seq_len: int, offset: int, dtype: torch.dtype, packed_seq: bool = False) -> None:
        key = (tuple(getattr(self, name, None) for name in _YARN_KEY), id(self.cp_group), self.inv_freq_extra.device,
               seq_len, offset, dtype, packed_seq)
        if key not in made:
            original(self, seq_len, offset, dtype, packed_seq)
            made[key] = (self.cos_cached, self.sin_cached)
            return
        self.max_seq_len_cached, self.offset_cached, self.dtype_cached, self.packed_seq_cached = seq_len, offset, dtype, packed_seq
        cos, sin = made[key]
        self.register_buffer("cos_cached", cos.clone(), persistent=False)
        self.register_buffer("sin_cached", sin.clone(), persistent=False)

    YarnRotaryEmbedding._set_cos_sin_cache = set_cache
    try:
        yield
    finally:
        YarnRotaryEmbedding._set_cos_sin_cache = original


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
