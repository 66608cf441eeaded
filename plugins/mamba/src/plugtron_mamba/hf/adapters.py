"""The objects the HF bridge loads for ``Mamba2ForCausalLM`` and ``NemotronHForCausalLM``.

They satisfy ``plugtron_hf_bridge.adapter.HFAdapter`` (architecture, family,
hf_model_class, config_from_hf, config_to_hf, tensor_mappings,
tolerated_unused); the work is done by :mod:`.config` and :mod:`.tables`.
Importing this module needs neither the bridge nor torch: both load when a
conversion calls a method.
"""

from __future__ import annotations

from typing import Any

from .config import MAMBA2 as _MAMBA2_ARCH
from .config import NEMOTRON_H as _NEMOTRON_H_ARCH


class MambaHFAdapter:
    """HF <-> plugtron ``mamba`` family for one architecture."""

    family = "mamba"

    def __init__(self, architecture: str) -> None:
        self.architecture = architecture
        self.hf_model_class = f"transformers:{architecture}"

    def __repr__(self) -> str:
        return f"MambaHFAdapter({self.architecture!r})"

    def config_from_hf(self, hf_config: dict[str, Any], *, source: str | None = None) -> Any:
        from .config import config_from_hf

        return config_from_hf(hf_config, self.architecture, source=source)

    def config_to_hf(self, config: Any, *, passthrough: dict[str, Any] | None = None) -> dict[str, Any]:
        from .config import config_to_hf

        return config_to_hf(config, self.architecture, passthrough)

    def tensor_mappings(self, config: Any, *, te_fused_norms: bool = False) -> list[Any]:
        """``te_fused_norms`` is accepted and ignored: every Mamba spec fuses the layer norms into
        the first projection (``*.layer_norm_weight``), so there is one naming only."""
        from .tables import tensor_mappings

        return tensor_mappings(config)

    def tolerated_unused(self, name: str, config: Any) -> bool:
        """Only a tied model's ``lm_head.weight`` (full state dicts keep the copy)."""
        return name == "lm_head.weight" and bool(config.share_embeddings_and_output_weights)


MAMBA2 = MambaHFAdapter(_MAMBA2_ARCH)
NEMOTRON_H = MambaHFAdapter(_NEMOTRON_H_ARCH)
