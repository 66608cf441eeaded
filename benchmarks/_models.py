"""Model shapes used by the benchmarks, and the two ways of building them.

A shape is a plain JSON-able dict (it crosses the process boundary): the GPT
family fields plus megatron ``TransformerConfig`` keywords. Both paths get the
same explicit values, so neither silently relies on a different default:

* :func:`plugtron_config` -> ``GPTModelConfig`` for ``plugtron.build_model``;
* :func:`build_direct` -> megatron-core's ``GPTModel`` built by hand with the
  same layer spec as plugtron's ``torch`` spec (megatron's local spec with
  ``SDPACoreAttention`` as core attention).

Importing this module is cheap; torch loads inside the functions.
"""

from __future__ import annotations

from typing import Any

# GPTModelConfig fields that are GPTModel arguments rather than TransformerConfig keywords.
FAMILY_FIELDS = (
    "vocab_size", "seq_length", "position_embedding_type", "rotary_base",
    "share_embeddings_and_output_weights", "make_vocab_size_divisible_by",
)

_COMMON = {
    "use_cpu_initialization": True,
    "position_embedding_type": "rope",
    "share_embeddings_and_output_weights": False,
    "make_vocab_size_divisible_by": 128,
}

_LLAMA = {
    **_COMMON,
    "normalization": "RMSNorm",
    "activation": "silu",
    "gated_linear_unit": True,
    "add_bias_linear": False,
    "add_qkv_bias": False,
    "rotary_base": 500000,
}

SHAPES: dict[str, dict[str, Any]] = {
    # GPT-2-small-like: LayerNorm, GeLU, biases; 134.2M parameters.
    "gpt-134m": {**_COMMON, "num_layers": 12, "hidden_size": 768, "num_attention_heads": 12,
                 "vocab_size": 32000, "seq_length": 1024, "rotary_base": 10000},
    # Llama-style small (GQA, RMSNorm, SwiGLU, no biases); ~140M parameters.
    "llama-140m": {**_LLAMA, "num_layers": 12, "hidden_size": 768, "num_attention_heads": 12,
                   "num_query_groups": 4, "ffn_hidden_size": 2560, "vocab_size": 32000, "seq_length": 2048},
    # TinyLlama-1.1B-shaped.
    "llama-1.1b": {**_LLAMA, "num_layers": 22, "hidden_size": 2048, "num_attention_heads": 32,
                   "num_query_groups": 4, "ffn_hidden_size": 5632, "vocab_size": 32000, "seq_length": 2048},
    # Llama-3-8B-shaped.
    "llama3-8b": {**_LLAMA, "num_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
                  "num_query_groups": 8, "ffn_hidden_size": 14336, "vocab_size": 128256, "seq_length": 8192},
    # Llama-3-70B-shaped.
    "llama3-70b": {**_LLAMA, "num_layers": 80, "hidden_size": 8192, "num_attention_heads": 64,
                   "num_query_groups": 8, "ffn_hidden_size": 28672, "vocab_size": 128256, "seq_length": 8192},
    # Small model for forward/backward throughput.
    "gpt-tiny": {**_COMMON, "num_layers": 4, "hidden_size": 256, "num_attention_heads": 4,
                 "vocab_size": 8192, "seq_length": 256, "rotary_base": 10000},
}


def split(shape: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(family fields, TransformerConfig keywords), with ``activation`` resolved."""
    import torch.nn.functional as F

    family = {k: v for k, v in shape.items() if k in FAMILY_FIELDS}
    transformer = {k: v for k, v in shape.items() if k not in FAMILY_FIELDS and k != "activation"}
    if "activation" in shape:
        transformer["activation_func"] = {"silu": F.silu, "gelu": F.gelu}[shape["activation"]]
    return family, transformer


def padded_vocab(shape: dict[str, Any]) -> int:
    multiple = shape["make_vocab_size_divisible_by"]
    return -(-shape["vocab_size"] // multiple) * multiple


BUILD_MODULES = (
    "torch", "megatron.core.models.gpt", "megatron.core.models.gpt.gpt_layer_specs",
    "megatron.core.pipeline_parallel", "plugtron.runtime.parallel",
    "plugtron_gpt.attention",  # both paths use the same core attention
)
PLUGTRON_MODULES = ("plugtron.pipeline.build", "plugtron.training", "plugtron_gpt.builder", "plugtron_gpt.config", "plugtron_gpt.specs")


def import_build_path(plugtron: bool) -> None:
    """Import everything the build touches, so timings exclude imports."""
    import importlib

    for name in BUILD_MODULES + (PLUGTRON_MODULES if plugtron else ()):
        importlib.import_module(name)


def plugtron_config(shape: dict[str, Any]) -> Any:
    from plugtron_gpt.config import GPTModelConfig

    family, transformer = split(shape)
    return GPTModelConfig(layer_spec="torch", **family, **transformer)


def build_direct(shape: dict[str, Any], parallel: Any) -> Any:
    """megatron-core's GPTModel from the same shape, layer spec assembled by hand."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig
    from plugtron_gpt.attention import SDPACoreAttention

    family, transformer = split(shape)
    config = TransformerConfig(**transformer)
    spec = get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm, normalization=config.normalization)
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab(shape),
        max_sequence_length=family["seq_length"],
        pre_process=True,
        post_process=True,
        share_embeddings_and_output_weights=family["share_embeddings_and_output_weights"],
        position_embedding_type=family["position_embedding_type"],
        rotary_base=family["rotary_base"],
        pg_collection=parallel.pg_collection,
    )


def count_params(modules: Any) -> int:
    modules = modules if isinstance(modules, (list, tuple)) else [modules]
    return sum(p.numel() for m in modules for p in m.parameters())


def direct_step(model: Any, batch: dict[str, Any], after: Any = None) -> Any:
    """One forward+backward of ``model`` on ``batch`` through megatron's own schedule, as a user calling
    megatron-core directly would write it (the reference side of the training benchmarks)."""
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    micro_batch_size, seq_length = batch["tokens"].shape

    def forward_step(data_iterator: Any, module: Any) -> Any:
        data = next(data_iterator)
        output = module(input_ids=data["tokens"], position_ids=data["position_ids"], attention_mask=None, labels=data["labels"])

        def loss_func(output_tensor: torch.Tensor) -> Any:
            loss = output_tensor.float().mean()
            return loss, {"loss": loss.detach()}

        return output, loss_func

    def step() -> None:
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([batch]), model=model, num_microbatches=1,
            seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=False,
        )
        if after is not None:
            after()

    return step
