"""The builder contract between a family plugin and the shared pipeline.

A family implements :meth:`ModelBuilder.build_stage` (one pipeline stage,
unwrapped); everything else — stages, hooks, placement, precision, meta
materialisation, DDP/FSDP — is the core pipeline's job.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, Callable

import attrs

if TYPE_CHECKING:
    import torch

    from plugtron.layer_specs import SpecChoice
    from plugtron.manager import PlugtronPluginManager
    from plugtron.runtime.parallel import ParallelContext

WRAPS = ("none", "ddp", "fsdp2", "megatron_fsdp")
PRECISIONS = ("auto", "float16module", "none")


@attrs.define
class BuildOptions:
    """How to build and wrap, independent of the model's shape.

    ``wrap``: ``none``, ``ddp`` (megatron DistributedDataParallel), ``fsdp2``
    (torch ``fully_shard`` per transformer layer) or ``megatron_fsdp`` (GPU only).
    ``mixed_precision``: ``auto`` wraps in megatron's Float16Module when the
    config asks for bf16/fp16, ``none`` never does.
    ``meta_device``: construct on the meta device, then materialise and
    initialise (fast and lean for large models).
    """

    wrap: str = attrs.field(default="none", validator=attrs.validators.in_(WRAPS))
    mixed_precision: str = attrs.field(default="auto", validator=attrs.validators.in_(PRECISIONS))
    meta_device: bool = False
    ddp_config: dict[str, Any] = attrs.field(factory=dict)
    #: After DDP wrapping, copy data-parallel rank 0's parameters to every replica.
    broadcast_params: bool = False
    #: Print the parameter count per (TP, PP) rank on rank 0 (the CLI prints its own report).
    print_report: bool = True
    device: str = attrs.field(default="auto", validator=attrs.validators.in_(("auto", "cpu", "cuda")))
    #: ``load_weights(chunk, context)`` fills a materialised meta chunk (e.g. from a
    #: checkpoint) instead of random initialisation; needs ``meta_device=True``.
    load_weights: Callable[[Any, "BuildContext"], None] | None = None


@attrs.define
class BuildContext:
    """What hooks get besides the chunks: the parallel layout, options, spec and builder."""

    parallel: "ParallelContext"
    options: BuildOptions
    builder: "ModelBuilder"
    spec: "SpecChoice | None" = None
    device: str = "cpu"


WrapHook = Callable[[list, Any, BuildContext], "list | None"]


class ModelBuilder(abc.ABC):
    """Builds one family's model stages; subclass per family."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.pre_wrap_hooks: list[WrapHook] = []
        self.post_wrap_hooks: list[WrapHook] = []
        self.spec_choice: "SpecChoice | None" = None

    # -- per-call hooks ----------------------------------------------------
    def register_pre_wrap_hook(self, hook: WrapHook, prepend: bool = False) -> None:
        """Run ``hook(model, config, context)`` after the plugins' pre-wrap hooks.

        ``build_model(config, pre_wrap_hooks=[...])`` appends here, so callers
        that never see the builder still reach this step.
        """
        self.pre_wrap_hooks.insert(0, hook) if prepend else self.pre_wrap_hooks.append(hook)

    def register_post_wrap_hook(self, hook: WrapHook, prepend: bool = False) -> None:
        """Run ``hook(model, config, context)`` after the plugins' post-wrap hooks (and DDP/FSDP)."""
        self.post_wrap_hooks.insert(0, hook) if prepend else self.post_wrap_hooks.append(hook)

    # -- what a family provides -------------------------------------------
    def select_spec(self, pm: "PlugtronPluginManager") -> "SpecChoice":
        from plugtron.layer_specs import select_layer_spec

        self.spec_choice = select_layer_spec(pm, self.config.family, self.config.layer_spec)
        return self.spec_choice

    def layer_spec(self) -> Any:
        """The spec object from the chosen factory (call :meth:`select_spec` first)."""
        if self.spec_choice is None:
            raise RuntimeError("select_spec() must run before layer_spec()")
        return self.spec_choice.info.load_factory()(self.config)

    @abc.abstractmethod
    def build_stage(
        self, *, pre_process: bool, post_process: bool, vp_stage: int | None, pg_collection: Any
    ) -> "torch.nn.Module":
        """Construct one unwrapped pipeline stage of the model."""

    def initialize_parameters(self, module: "torch.nn.Module") -> None:
        """Initialise a materialised (formerly meta) stage as an eager build would.

        The default follows megatron-core's conventions; families with special
        parameters (Mamba's A_log, dt_bias ...) extend it.
        """
        from plugtron.pipeline.materialize import megatron_default_init

        megatron_default_init(module, self.config)

    def fsdp_unit_types(self) -> tuple[type, ...]:
        """Module types that FSDP2 shards as units (whole layers, never embeddings)."""
        from megatron.core.transformer.transformer_layer import TransformerLayer

        return (TransformerLayer,)

    def tp_row_blocks(self, name: str, param: Any) -> list[int] | None:
        """Block layout of a tensor-parallel parameter (global ``name``), or ``None`` for a plain split.

        Used wherever full tensors meet TP shards (checkpoints, conversion,
        parity checks): see :func:`plugtron.sharding.tp_slice`.
        """
        return None

    def forward_step(self, model: "torch.nn.Module", batch: dict[str, Any]) -> Any:
        """Run one micro-batch; return the per-token loss tensor [b, s] (or logits when no labels)."""
        raise NotImplementedError(f"{type(self).__name__} does not define a training step")

    def random_batch(self, batch_size: int, seq_length: int, seed: int = 0) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} does not define a random batch")


class LanguageModelBuilder(ModelBuilder):
    """A builder for token-in, loss-out language models (GPT, Mamba ...).

    Gives the batch and step contract megatron's language models share:
    ``model(input_ids, position_ids, attention_mask, labels)`` returns the
    per-token loss [b, s] with labels and the logits without.
    """

    def language_model_kwargs(self, *, pre_process: bool, post_process: bool, pg_collection: Any) -> dict[str, Any]:
        """Constructor keywords every megatron language model takes (``GPTModel``, ``MambaModel``),
        from the :class:`~plugtron.config.language.LanguageModelConfig` fields; a family adds its own
        (position embeddings, MTP, the hybrid pattern ...)."""
        cfg = self.config
        return dict(
            config=cfg.transformer,
            vocab_size=cfg.padded_vocab_size(),
            max_sequence_length=cfg.seq_length,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=cfg.parallel_output,
            share_embeddings_and_output_weights=cfg.share_embeddings_and_output_weights,
            pg_collection=pg_collection,
        )

    def tp_row_blocks(self, name: str, param: Any) -> list[int] | None:
        """Gated MLPs keep ``[gate_r; up_r]`` per rank: two equal blocks."""
        if self.config.gated_linear_unit and name.endswith(("mlp.linear_fc1.weight", "mlp.linear_fc1.bias")):
            rows = self.config.ffn_hidden_size
            return [rows, rows]
        return None

    def random_batch(self, batch_size: int, seq_length: int, seed: int = 0) -> dict[str, Any]:
        """Random tokens from the unpadded vocab, labels shifted by one, positions 0..s-1."""
        import torch

        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, self.config.vocab_size, (batch_size, seq_length + 1), generator=gen)
        positions = torch.arange(seq_length).unsqueeze(0).expand(batch_size, -1).contiguous()
        return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(), "position_ids": positions}

    def forward_step(self, model: "torch.nn.Module", batch: dict[str, Any]) -> Any:
        return model(
            input_ids=batch["tokens"],
            position_ids=batch["position_ids"],
            attention_mask=batch.get("attention_mask"),
            labels=batch.get("labels"),
        )
