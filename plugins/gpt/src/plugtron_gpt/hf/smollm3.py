"""``SmolLM3ForCausalLM``: Llama's table and config, some layers without RoPE, optional sliding windows.

``no_rope_layers`` lists, per layer, 1 where the layer *uses* RoPE (derived,
when absent, as every ``no_rope_layer_interval``-th layer without it).
megatron's ``no_rope_freq`` is the opposite flag, 1 where RoPE is *skipped*
(its int form N skips layers N, 2N ... counted from 1, the same pattern the
interval gives), so each entry is flipped.

Windows: a layer typed ``sliding_attention`` gets a sliding-window mask
(transformers builds it from ``sliding_window``), derived only for layers
without RoPE and only with ``use_sliding_window``. A file typing layers
sliding while ``use_sliding_window`` is false gets a windowed mask in eager
and SDPA attention but none in flash attention, so it is refused.
"""

from __future__ import annotations

from typing import Any

from plugtron.conversion import INT, ConfigReader, ConfigSchema, UnsupportedConfigError

from .adapter import GPTAdapter
from .architecture import Fields
from .llama import (DEFAULTS, FULL, LLAMA, SLIDING, WINDOW, head_dim_of, layer_types_of, read_decoder, window_fields,
                    windowed_layers, write_decoder)
from .rope import need_value

DEFAULT_THETA = 2000000.0  # SmolLM3Config.default_theta


def _derive(values: dict[str, Any]) -> None:
    """SmolLM3Config's derivations: kv heads, ``no_rope_layers`` from the interval, ``layer_types`` from both."""
    layers = values["num_hidden_layers"]
    if values["num_key_value_heads"] is None:
        values["num_key_value_heads"] = values["num_attention_heads"]
    if values["no_rope_layers"] is None:
        interval = values["no_rope_layer_interval"]
        if not interval:
            raise UnsupportedConfigError("no_rope_layer_interval", f"must be a positive integer, not {interval!r}")
        values["no_rope_layers"] = [int((i + 1) % interval != 0) for i in range(layers)]
    if values["layer_types"] is None:
        window_on = values["use_sliding_window"] and values["sliding_window"] is not None
        values["layer_types"] = [SLIDING if window_on and not has_rope else FULL
                                 for has_rope in values["no_rope_layers"][:layers]]


def _read(k: ConfigReader) -> Fields:
    attn_bias, mlp_bias = bool(k.get("attention_bias")), bool(k.get("mlp_bias"))
    if attn_bias != mlp_bias:
        raise k.fail("mlp_bias", f"is {mlp_bias} while attention_bias is {attn_bias}; megatron's add_bias_linear sets both")
    layers = k.get("num_hidden_layers")
    k.mark("no_rope_layer_interval")  # acts through the derived no_rope_layers
    uses_rope = k.get("no_rope_layers")
    if not isinstance(uses_rope, list) or len(uses_rope) != layers or any(v not in (0, 1) for v in uses_rope):
        raise k.fail("no_rope_layers", f"{uses_rope!r:.200} must hold one 0/1 entry per layer ({layers})")
    types = layer_types_of(k, layers)
    window, window_on = k.get("sliding_window"), k.get("use_sliding_window")
    if SLIDING in types and not (window_on and window is not None):
        raise k.fail("layer_types", f"types layers sliding_attention while use_sliding_window is {window_on} and "
                                    f"sliding_window {window}; transformers' attention kernels disagree on that")
    fields = read_decoder(k, add_bias_linear=attn_bias, add_qkv_bias=attn_bias, qk_layernorm=False,
                          rope_theta_default=DEFAULT_THETA)
    if not all(uses_rope):
        fields["no_rope_freq"] = [0 if v else 1 for v in uses_rope]
    return {**fields, **window_fields(k, window, [t == SLIDING for t in types])}


def no_rope_layers_to_hf(f: Fields) -> list[int]:
    """HF ``no_rope_layers`` (1 = RoPE) for megatron's ``no_rope_freq`` as megatron expands it."""
    skip, layers = f.get("no_rope_freq"), f["num_layers"]
    if not skip:
        return [1] * layers
    if isinstance(skip, int) and not isinstance(skip, bool):
        return [int((i + 1) % skip != 0) for i in range(layers)]
    if len(skip) != layers:
        raise UnsupportedConfigError("no_rope_freq", f"has {len(skip)} entries for {layers} layers")
    return [0 if v else 1 for v in skip]


def _write(f: Fields) -> dict[str, Any]:
    arch = SMOLLM3.name
    bias = need_value(f, "add_bias_linear", (True, False), arch, True)
    if not bias:
        need_value(f, "add_qkv_bias", (False,), arch, False)
    window, windowed = windowed_layers(f, arch)
    out = {**write_decoder(f, arch, qk_layernorm=False), "attention_bias": bias, "mlp_bias": bias,
           "no_rope_layers": no_rope_layers_to_hf(f), "use_sliding_window": window is not None,
           "sliding_window": window, "layer_types": [SLIDING if w else FULL for w in windowed]}
    if head_dim_of(f) != f["hidden_size"] // f["num_attention_heads"]:
        out["head_dim"] = head_dim_of(f)
    return out


SMOLLM3 = LLAMA.derive(
    name="SmolLM3ForCausalLM", model_type="smollm3", config_class="SmolLM3Config", read=_read, write=_write,
    expresses=WINDOW | {"no_rope_freq"},
    schema=ConfigSchema(
        defaults={**DEFAULTS, "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 11008,
                  "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 4,
                  "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "use_sliding_window": False,
                  "sliding_window": None, "no_rope_layers": None, "no_rope_layer_interval": 4, "layer_types": None,
                  "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": True},
        types={"no_rope_layer_interval": INT}, derive=_derive,
        # HuggingFaceTB/SmolLM3-3B's file: Llama's pretraining_tp, Qwen2's max_window_layers; SmolLM3 reads neither.
        non_numeric=frozenset({"pretraining_tp", "max_window_layers"})))

ADAPTER = GPTAdapter(SMOLLM3)
