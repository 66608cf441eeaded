"""Logit parity between HF models and megatron-core GPTModel built from the converted tensors.

Run as a subprocess by test_hfb_megatron_parity.py because it initialises a
one-process gloo group and patches ``torch.cuda.current_device`` (megatron's
RoPE moves its frequencies to "the CUDA device"; on CPU we point it at "cpu"),
neither of which should leak into the pytest process.

Prints one JSON line per case: {"case", "diff", "scale", "rope_sensitivity"}.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
import tempfile

import torch

torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]

import transformers  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.models.gpt.gpt_model import GPTModel  # noqa: E402
from megatron.core.tensor_parallel.random import initialize_rng_tracker  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from plugtron.config.base import padded_vocab_size  # noqa: E402
from plugtron.conversion.table import hf_to_megatron  # noqa: E402
from plugtron_gpt.hf.catalogue import mapping_for, to_megatron_fields  # noqa: E402

SEQ = 48
# GPTModel constructor arguments among the fields; everything else must be a TransformerConfig field.
GPT_MODEL_ARGS = {"vocab_size", "seq_length", "position_embedding_type", "rotary_base", "rotary_percent",
                  "rope_scaling", "rope_scaling_factor", "seq_len_interpolation_factor",
                  "share_embeddings_and_output_weights"}


def build_megatron(fields: dict, padded_vocab: int) -> GPTModel:
    """Build GPTModel from the architecture's fields, proving every field name is a real megatron name."""
    tc_names = {f.name for f in dataclasses.fields(TransformerConfig)}
    tc_kwargs = dict(use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
                     bias_activation_fusion=False, persist_layer_norm=False)
    yarn = {}
    for key, value in fields.items():
        if key == "activation":
            module, fn = value.split(":")
            tc_kwargs["activation_func"] = getattr(importlib.import_module(module), fn)
        elif key.startswith("yarn_"):
            yarn[key] = value  # read by GPTModel/attention via getattr on the config
        elif key in tc_names:
            tc_kwargs[key] = value
        elif key not in GPT_MODEL_ARGS:
            raise KeyError(f"field {key!r} is neither a TransformerConfig field nor a GPTModel argument")
    config = TransformerConfig(**tc_kwargs)
    for key, value in yarn.items():
        setattr(config, key, value)
    spec = get_gpt_layer_local_spec(normalization=fields["normalization"], qk_layernorm=fields["qk_layernorm"])
    model_args = {k: fields[k] for k in GPT_MODEL_ARGS - {"vocab_size", "seq_length"} if k in fields}
    return GPTModel(config, spec, vocab_size=padded_vocab, max_sequence_length=fields["seq_length"], **model_args).eval()


def run_case(name: str, arch: str, cfg: transformers.PretrainedConfig, plain_rope_cfg=None) -> dict:
    torch.manual_seed(0)
    hf = getattr(transformers, arch)(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    hf_dict = cfg.to_dict()
    hf_dict["architectures"] = [arch]
    fields = to_megatron_fields(hf_dict)
    padded = padded_vocab_size(fields["vocab_size"], 16)
    model = build_megatron(fields, padded)
    converted = dict(hf_to_megatron(mapping_for(arch, fields, padded_vocab_size=padded), hf.state_dict().__getitem__))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    got = {k: tuple(v.shape) for k, v in converted.items()}
    if expected != got:
        raise AssertionError(f"{name}: megatron names/shapes differ: {sorted(set(expected.items()) ^ set(got.items()))}")
    model.load_state_dict(converted, strict=False)
    ids = torch.randint(0, fields["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(1))
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), 1)  # True = masked
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids, torch.arange(SEQ)[None].expand(2, -1), attention_mask=mask)[..., : fields["vocab_size"]]
        sensitivity = None
        if plain_rope_cfg is not None:  # how much the RoPE scaling matters: proves the check can fail
            plain = getattr(transformers, arch)(plain_rope_cfg).eval()
            plain.load_state_dict(hf.state_dict())
            sensitivity = (plain(ids).logits - ref).abs().max().item()
    return {"case": name, "diff": (ref - out).abs().max().item(), "scale": ref.abs().max().item(),
            "rope_sensitivity": sensitivity}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run_all(os.path.join(tmp, "store"))


def run_all(store: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)  # CPU: no CUDA RNG states

    small = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    T = transformers
    cases = {
        "llama": ("LlamaForCausalLM", lambda **k: T.LlamaConfig(**small, **k), {}),
        "llama_bias_tied": ("LlamaForCausalLM", lambda **k: T.LlamaConfig(**small, attention_bias=True, mlp_bias=True,
                                                                             tie_word_embeddings=True, **k), {}),
        "mistral": ("MistralForCausalLM", lambda **k: T.MistralConfig(**small, sliding_window=None, **k), {}),
        "qwen2": ("Qwen2ForCausalLM", lambda **k: T.Qwen2Config(**small, **k), {}),
        "qwen3": ("Qwen3ForCausalLM", lambda **k: T.Qwen3Config(**small, head_dim=32, **k), {}),
        "llama3_rope": ("LlamaForCausalLM", lambda **k: T.LlamaConfig(**dict(small, max_position_embeddings=16384), **k),
                        dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=8192)),
        "linear_rope": ("LlamaForCausalLM", lambda **k: T.LlamaConfig(**small, **k), dict(rope_type="linear", factor=4.0)),
        "qwen2_yarn": ("Qwen2ForCausalLM", lambda **k: T.Qwen2Config(**small, **k),
                       dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16)),
        "qwen3_yarn_mscale": ("Qwen3ForCausalLM", lambda **k: T.Qwen3Config(**small, head_dim=32, **k),
                              dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, mscale=0.8,
                                   mscale_all_dim=0.5, beta_fast=16.0, beta_slow=2.0)),
    }
    wanted = set(sys.argv[1:])
    for name, (arch, make, rope) in cases.items():
        if wanted and name not in wanted:
            continue
        if rope:
            scaled = make(rope_parameters=dict(rope, rope_theta=10000.0))
            plain = make(rope_parameters=dict(rope_type="default", rope_theta=10000.0))
            print(json.dumps(run_case(name, arch, scaled, plain)), flush=True)
        else:
            print(json.dumps(run_case(name, arch, make())), flush=True)
    if not wanted or "gpt2" in wanted:
        gpt2 = T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0,
                            eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        print(json.dumps(run_case("gpt2", "GPT2LMHeadModel", gpt2)), flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
