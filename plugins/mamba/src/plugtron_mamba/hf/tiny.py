"""Tiny random Mamba2 / NemotronH transformers models, built from configs (never downloaded).

For tests, demos and benchmarks of the converters: small enough to run in
seconds on a CPU, but with every structural feature the tables must get right
(several groups, GQA attention, a non-gated MLP, a vocabulary that megatron pads,
a sequence length that is not a multiple of the chunk size).

Weights are re-drawn so logits are far from zero and no parameter sits at a
symmetric default (``D`` = 1, norms = 1) that would hide a swapped tensor:
projections ~ N(0, 0.1), norm weights ~ 1 + N(0, 0.1), ``A_log``/``dt_bias`` ~ N(0, 0.2).
With these, ``softplus(dt + dt_bias)`` stays far above NemotronH's
``time_step_min`` clamp (see :mod:`.config`), which megatron does not apply.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import MAMBA2, NEMOTRON_H

#: NemotronH layer pattern of the tiny model: every layer kind, Mamba first and last.
TINY_PATTERN = "M*-M-*M"
_TYPES = {"M": "linear_attention", "*": "full_attention", "-": "mlp"}


def tiny_hf_config(arch: str, *, vocab: int = 100, tied: bool = False, chunk_size: int = 8,
                   layers: int = 3, pattern: str = TINY_PATTERN) -> Any:
    """A transformers config; ``layers`` is used by Mamba2, ``pattern`` by NemotronH."""
    import transformers

    mixer = dict(hidden_size=64, n_groups=2, chunk_size=chunk_size, vocab_size=vocab, layer_norm_epsilon=1e-5)
    if arch == MAMBA2:
        return transformers.Mamba2Config(num_heads=8, head_dim=16, expand=2, state_size=16, num_hidden_layers=layers,
                                         tie_word_embeddings=tied, **mixer)
    if arch == NEMOTRON_H:
        return transformers.NemotronHConfig(
            layers_block_type=[_TYPES[s] for s in pattern], num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=96, mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, max_position_embeddings=64,
            **mixer)
    raise ValueError(f"no tiny config for {arch!r}")


def randomize(model: Any, seed: int = 0) -> Any:
    """Re-draw every parameter (see the module docstring); returns the model in eval mode."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if name.endswith(("norm.weight", "norm_f.weight")):
                value = 1.0 + 0.1 * noise
            elif name.endswith(("A_log", "dt_bias")):
                value = 0.2 * noise
            else:
                value = 0.1 * noise
            param.copy_(value.to(param.dtype))
    return model.eval()


def tiny_hf_model(arch: str, *, seed: int = 0, **config: Any) -> Any:
    """A float32 transformers model of :func:`tiny_hf_config`, randomised, in eval mode."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, arch)(tiny_hf_config(arch, **config)).float()
    return randomize(model, seed)


def save_tiny_hf(directory: str | Path, arch: str, *, seed: int = 0, dtype: str = "float32", **config: Any) -> Path:
    """Save :func:`tiny_hf_model` as a safetensors checkpoint directory (what ``plugtron convert`` reads)."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    directory = Path(directory)
    tiny_hf_model(arch, seed=seed, **config).to(getattr(torch, dtype)).save_pretrained(directory)
    return directory


# -- NemotronH with MoE (``E``) layers ------------------------------------------------------------
#: Every layer kind, MoE layers at both ends of the stack and after attention.
TINY_MOE_PATTERN = "EM*E-ME"
#: Routing that exercises every translated knob: sigmoid scores with a (randomised) correction bias,
#: group-limited routing (2 groups of 4, 1 kept, 2 experts chosen: megatron's top-(2 // 1) group score
#: equals transformers' top-2 sum), renormalised top-k, routed scaling, a shared expert.
TINY_MOE: dict[str, Any] = dict(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                                norm_topk_prob=True, routed_scaling_factor=2.5, moe_intermediate_size=48,
                                moe_shared_expert_intermediate_size=32)


def tiny_moe_hf_config(*, pattern: str = TINY_MOE_PATTERN, **changes: Any) -> Any:
    """A NemotronHConfig with ``moe`` layers (:data:`TINY_MOE`, overridden by ``changes``)."""
    cfg = tiny_hf_config(NEMOTRON_H, pattern=pattern.replace("E", "-"))
    cfg.layers_block_type = [{"E": "moe", **_TYPES}[s] for s in pattern]
    for key, value in {**TINY_MOE, **changes}.items():
        setattr(cfg, key, value)
    return cfg


def tiny_moe_hf_model(*, seed: int = 0, **changes: Any) -> Any:
    """:func:`tiny_moe_hf_config` as a float32 model, randomised, with its routers'
    ``e_score_correction_bias`` buffers drawn too (~ N(0, 0.1): they change which experts are chosen)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = randomize(transformers.NemotronHForCausalLM(tiny_moe_hf_config(**changes)).float(), seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=gen))
    return model


def save_tiny_moe_hf(directory: str | Path, *, seed: int = 0, dtype: str = "float32", **changes: Any) -> Path:
    """Save :func:`tiny_moe_hf_model` (per-expert tensors, as published NemotronH checkpoints). The routers'
    ``e_score_correction_bias`` stays float32 in any dtype, as transformers keeps it (and saves it)."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    directory = Path(directory)
    model = tiny_moe_hf_model(seed=seed, **changes).to(getattr(torch, dtype))
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.data = buffer.data.float()
    model.save_pretrained(directory)
    return directory
