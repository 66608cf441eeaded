"""Hook specifications of plugtron.

A plugin is any module or object with functions named like the specs below,
decorated with :data:`plugtron.hookimpl`. Distributions announce plugins with an
entry point in the ``plugtron`` group::

    [project.entry-points.plugtron]
    my_family = "my_package.plugin"

Registration hooks must stay cheap: return records naming classes by import
path, and never import torch or megatron at module level of the plugin.

Order: pluggy calls implementations ``tryfirst`` first, then the most recently
registered first, then ``trylast``. The two wrap hooks are *chained*: each
implementation receives the chunk list returned by the one before it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from plugtron._markers import hookspec

if TYPE_CHECKING:
    from plugtron.builder import BuildContext, ModelBuilder
    from plugtron.records import ConverterInfo, FamilyInfo, LayerSpecInfo


@hookspec
def plugtron_register_families() -> "list[FamilyInfo]":
    """Declare the model families this plugin provides.

    Called once when the plugin manager loads. Return records only; the
    config and builder classes are named by import path and imported when a
    family is first built. A family name may be claimed by one plugin only:
    a second claim is an error naming both distributions.

    Config files are untrusted: a callable field (``activation_func``,
    ``init_method`` ...) loads only torch/megatron activations and
    ``torch.nn.init`` methods, plus the exact ``"module:function"`` paths a
    family lists in ``config_callables`` (a model using its own activation
    must declare it, or its saved configs cannot be saved or loaded).

    Example::

        from plugtron import FamilyInfo, hookimpl

        @hookimpl
        def plugtron_register_families():
            return [
                FamilyInfo(
                    name="gpt",
                    config_class="plugtron_gpt.config:GPTModelConfig",
                    builder_class="plugtron_gpt.builder:GPTModelBuilder",
                    description="Decoder-only transformer (GPT, Llama, Qwen ...)",
                    config_callables=("my_package.activations:gelu_tanh",),  # optional
                )
            ]
    """


@hookspec
def plugtron_register_layer_specs() -> "list[LayerSpecInfo]":
    """Offer named layer specs (``te``, ``local``, ``torch`` ...) for families.

    Any plugin may offer specs for any family, including another plugin's.
    ``check`` must answer quickly and without side effects (look for a module
    with ``importlib.util.find_spec``, ask ``torch.cuda.is_available()``).
    For ``layer_spec="auto"`` the core picks the available spec with the
    highest ``priority``; a named choice that is unavailable is an error
    carrying the check's reason.

    Example::

        from plugtron import LayerSpecInfo, hookimpl

        @hookimpl
        def plugtron_register_layer_specs():
            return [
                LayerSpecInfo(
                    family="gpt",
                    name="flash",
                    factory="my_package.specs:flash_layer_spec",  # (config) -> ModuleSpec
                    check="my_package.specs:flash_available",     # () -> Availability
                    priority=150,
                    description="attention through my flash kernel",
                )
            ]
    """


@hookspec(firstresult=True)
def plugtron_create_builder(config: Any, family: "FamilyInfo") -> "ModelBuilder | None":
    """Return the builder for ``config``, or ``None`` to let others answer.

    The first non-``None`` result wins. The core registers a last-resort
    implementation (``trylast``) that instantiates ``family.builder_class``,
    so a family plugin needs no implementation at all; a third party that
    wants its own builder for an existing family marks it ``tryfirst``.

    Example::

        from plugtron import hookimpl
        from plugtron_gpt.builder import GPTModelBuilder

        class CheckpointedGPTBuilder(GPTModelBuilder):
            def build_stage(self, **kwargs):
                stage = super().build_stage(**kwargs)
                stage.decoder.config.recompute_granularity = "full"
                return stage

        @hookimpl(tryfirst=True)
        def plugtron_create_builder(config, family):
            if family.name == "gpt" and config.num_layers > 48:
                return CheckpointedGPTBuilder(config)
            return None
    """


@hookspec
def plugtron_moe_submodules(config: Any, family: "FamilyInfo") -> "dict[str, Any] | None":
    """Replace the router, the routed experts or the shared experts of a family's MoE layers.

    Called once per stage build, for a config with Mixture-of-Experts layers,
    by families that build megatron's ``MoELayer`` (the GPT family does).
    Return ``None`` to keep the family's modules, or a dict with any of these
    keys (megatron's ``MoESubmodules`` fields):

    * ``"router"``: a class (or factory) called as ``cls(config=..., pg_collection=...)``,
      usually a subclass of megatron's ``TopKRouter``;
    * ``"experts"`` / ``"shared_experts"``: a megatron ``ModuleSpec``, or just
      a class, which then keeps the default spec's ``submodules`` and
      ``params`` (a ``SequentialMLP`` subclass gets the same linears).

    A value may also be an import path (``"package.module:Name"``), resolved
    when the model is built, so the plugin module itself need not import
    torch or megatron. The replacement applies to every MoE layer, whatever
    layer spec was chosen (``torch``, ``local``, ``te`` or a plugin's), and to
    the MTP layers. The family checks the keys: an unknown key, or
    ``shared_experts`` for a config without shared experts (they would be
    ignored silently), is an error naming the plugin.

    Every plugin's answer counts, so one plugin may replace the router and
    another the experts; two plugins replacing the same part is an error
    naming both (no silent winner by registration order).

    Example (a router that counts its calls and pins every token to the
    first ``topk`` experts, e.g. to test expert placement)::

        # my_package/routing.py
        import torch
        from megatron.core.transformer.moe.router import TopKRouter

        class PinnedRouter(TopKRouter):
            calls = 0

            def routing(self, logits, padding_mask=None):
                type(self).calls += 1
                tokens = logits.reshape(-1, self.config.num_moe_experts).shape[0]
                routing_map = torch.zeros(tokens, self.config.num_moe_experts, dtype=torch.bool, device=logits.device)
                routing_map[:, : self.topk] = True
                probs = routing_map.to(logits.dtype) / self.topk
                return probs, routing_map

        # my_package/plugin.py  (no torch import here)
        from plugtron import hookimpl

        @hookimpl
        def plugtron_moe_submodules(config, family):
            if family.name != "gpt":
                return None
            return {"router": "my_package.routing:PinnedRouter"}
    """


@hookspec
def plugtron_pre_wrap(model: "list[Any]", config: Any, context: "BuildContext") -> "list[Any] | None":
    """Adjust the model chunks before device placement and wrapping.

    ``model`` holds one ``torch.nn.Module`` per virtual-pipeline stage of this
    rank, still unwrapped (and on the meta device for meta builds). Return a
    new list to replace it, or ``None`` to keep the (possibly mutated) list.
    Implementations are chained: each sees the result of the previous one.
    Per-call hooks then run after all plugin implementations, in list order:
    first those registered with ``builder.register_pre_wrap_hook``, then those
    passed as ``build_model(config, pre_wrap_hooks=[...])``. Use a per-call
    hook for what one build needs (a script, a test); a plugin for what every
    build should get.

    Example (freeze the embeddings of every chunk that has them)::

        from plugtron import hookimpl

        @hookimpl
        def plugtron_pre_wrap(model, config, context):
            for chunk in model:
                embedding = getattr(chunk, "embedding", None)
                if embedding is not None:
                    embedding.requires_grad_(False)
            return None

    With tied embeddings under pipeline parallelism only the first stage has
    ``embedding``; the pipeline then freezes the last stage's copy
    (``output_layer.weight``) too, with a warning, because the two copies
    are one weight (:mod:`plugtron.pipeline.tied`).
    """


@hookspec
def plugtron_post_wrap(model: "list[Any]", config: Any, context: "BuildContext") -> "list[Any] | None":
    """Adjust the model chunks after mixed precision and DDP/FSDP wrapping.

    Same contract as :func:`plugtron_pre_wrap`, run as the last step of the
    pipeline; chunks are now wrapped (``DistributedDataParallel``,
    ``Float16Module``, FSDP2 modules) as the build options asked. Per-call
    hooks (``builder.register_post_wrap_hook``, then
    ``build_model(config, post_wrap_hooks=[...])``) run after the plugins'.

    Example (log the wrapped types on the first rank)::

        from plugtron import hookimpl

        @hookimpl
        def plugtron_post_wrap(model, config, context):
            if context.parallel.rank == 0:
                print([type(chunk).__name__ for chunk in model])
    """


@hookspec
def plugtron_register_converters() -> "list[ConverterInfo]":
    """Declare weight converters: (source format, architecture) -> family.

    The adapter is named by import path and loaded only when a conversion of
    that architecture runs; the conversion engine of the source format (the
    HF bridge for ``"hf"``) defines what the adapter must provide. Two plugins
    claiming the same (format, architecture) is an error naming both.

    Example::

        from plugtron import ConverterInfo, hookimpl

        @hookimpl
        def plugtron_register_converters():
            return [
                ConverterInfo(
                    source_format="hf",
                    architecture="MyLlamaForCausalLM",
                    family="gpt",
                    adapter="my_package.convert:MyLlamaAdapter",
                    description="Llama with a renamed norm",
                )
            ]
    """


@hookspec
def plugtron_add_commands(commands: Any) -> None:
    """Add sub-commands to the ``plugtron`` command line.

    ``commands`` is the ``argparse`` sub-parsers object. Build the parser
    here and keep every heavy import inside the function you set as ``run``:
    ``plugtron --help`` and ``plugtron plugins`` must stay fast. ``run(args)``
    returns the exit code; raise :class:`plugtron.PlugtronError` for a clean
    one-line error.

    Example::

        from plugtron import hookimpl

        def _run(args):
            from my_package.report import summarize  # imports torch: only when run

            print(summarize(args.checkpoint))
            return 0

        @hookimpl
        def plugtron_add_commands(commands):
            parser = commands.add_parser("summarize", help="summarize a checkpoint")
            parser.add_argument("checkpoint")
            parser.set_defaults(run=_run)
    """
