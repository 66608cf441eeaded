"""Architecture cases for the shared parity tests (``test_arch_parity.py``, ``test_arch_multirank.py``).

Each module here (one per group of architectures) defines ``CASES``: a list
of :class:`Case`. Adding a case adds its TP=1 parity and bit-exact round trip,
its config round trip, and (unless switched off) its TP=2 and PP=2 parity in
the one two-rank launch. Checkpoints are tiny random models made from the
config with transformers, never downloaded.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Case:
    #: test id, e.g. ``"gemma2"``
    name: str
    #: ``architectures[0]``, e.g. ``"Gemma2ForCausalLM"``
    architecture: str
    #: keyword arguments of the transformers config class (small sizes: 4 layers, width 64)
    config: dict[str, Any] = field(default_factory=dict)
    #: run TP=2 / PP=2 parity in the two-rank launch
    tp2: bool = True
    pp2: bool = True
    #: tokens per sequence for parity (longer than a sliding window, to exercise it)
    seq: int | None = None
    #: weight std: large enough that logits are far from zero, small enough to stay in tanh's live range
    std: float = 0.2


def all_cases() -> list[Case]:
    """Every ``CASES`` of every module of this package, in module order."""
    cases: list[Case] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        cases.extend(importlib.import_module(f"{__name__}.{info.name}").CASES)
    return cases


def config_class(architecture: str) -> Any:
    """The config class the model class itself declares (``Gemma3ForCausalLM`` takes ``Gemma3TextConfig``)."""
    import transformers

    return getattr(transformers, architecture).config_class


def save_case(directory: Path, case: Case, *, seed: int = 0, dtype: str = "float32",
              **overrides: Any) -> Path:
    """A random ``case`` model saved as an HF checkpoint (``overrides`` change config keys)."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    config = config_class(case.architecture)(**{**case.config, **overrides})
    model = getattr(transformers, case.architecture)(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, case.std)
    model.to(getattr(torch, dtype)).save_pretrained(directory)
    return directory


def hf_logits(directory: Path, tokens: Any) -> Any:
    """transformers' float32 logits of a saved checkpoint (eager attention: the reference path)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager",
                                                              dtype=torch.float32)
    with torch.no_grad():
        return model(tokens).logits


def field_matters(tmp: Path, case: Case, key: str, value: Any, *, seq: int = 24) -> float:
    """Max |logit change| in transformers when config ``key`` becomes ``value``, weights unchanged.

    A field the converter translates must move transformers' logits, or its
    parity test proves nothing about it.
    """
    import torch

    base = save_case(tmp / f"{key}-base", case)
    changed = save_case(tmp / f"{key}-changed", case, **{key: value})
    tokens = torch.randint(0, case.config.get("vocab_size", 100), (1, seq), generator=torch.Generator().manual_seed(0))
    return float((hf_logits(base, tokens) - hf_logits(changed, tokens)).abs().max())
