"""The generated Qwen3-MoE-shaped checkpoint of ``bench_moe_convert.py``: written with safetensors in the
published per-expert layout, and read back as headers to compute each rank's share."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

#: Qwen3-MoE shapes: hidden, layers, heads, kv heads, experts, top-k, expert ffn, vocab, shard MiB.
SHAPES = {
    "qwen3moe-1b": dict(hidden=1024, layers=12, heads=16, kv=4, experts=64, topk=8, ffn=384, vocab=32000, shard_mib=512),
    "qwen3moe-250m": dict(hidden=512, layers=8, heads=8, kv=4, experts=32, topk=4, ffn=512, vocab=32000, shard_mib=128),
}
EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.")


# -- child side: generating the checkpoint --------------------------------------------------------------
def hf_config(shape: str) -> dict[str, Any]:
    import transformers

    s = SHAPES[shape]
    config = transformers.Qwen3MoeConfig(
        hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        num_key_value_heads=s["kv"], num_experts=s["experts"], num_experts_per_tok=s["topk"],
        moe_intermediate_size=s["ffn"], intermediate_size=s["ffn"] * 4, vocab_size=s["vocab"],
        max_position_embeddings=4096, norm_topk_prob=True, tie_word_embeddings=False,
    ).to_dict()
    config.update(architectures=["Qwen3MoeForCausalLM"], dtype="bfloat16")
    return config


def make_checkpoint(directory: str, shape: str) -> dict[str, Any]:
    """Random bf16 Qwen3-MoE weights in the HF layout, layer by layer, written with safetensors directly."""
    import torch
    from safetensors.torch import save_file

    from plugtron_gpt.hf.catalogue import mapping_for, to_megatron_fields

    config = hf_config(shape)
    fields = to_megatron_fields(config)
    shapes = {n: s for m in mapping_for("Qwen3MoeForCausalLM", fields) for n, s in zip(m.hf_names, m.hf_shapes)}
    limit = SHAPES[shape]["shard_mib"] * 2**20
    groups: list[list[str]] = [[]]
    size = 0
    for name, dims in shapes.items():  # the table's order: globals, then layer by layer (as HF lays shards out)
        nbytes = torch.Size(dims).numel() * 2
        if size + nbytes > limit and groups[-1]:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    out = Path(directory)
    out.mkdir(parents=True)
    # Random values without drawing 1e9 normals (a minute on 2 loaded cores): each tensor is a copy of a slice of
    # one pool of normals, starting at a random offset. Only the bytes matter to a conversion.
    gen = torch.Generator().manual_seed(0)
    largest = max(torch.Size(d).numel() for d in shapes.values())
    pool = (torch.randn(largest + 2**22, generator=gen) * 0.02).to(torch.bfloat16)
    index, total = {}, 0
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            numel = torch.Size(shapes[name]).numel()
            start = int(torch.randint(0, 2**22, (), generator=gen))
            tensors[name] = pool[start:start + numel].clone().view(shapes[name])
            index[name] = file
            total += tensors[name].numel() * 2
        save_file(tensors, str(out / file), metadata={"format": "pt"})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": index}, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return {"bytes": total, "params": total // 2, "shards": len(groups), "tensors": len(shapes),
            "experts": SHAPES[shape]["experts"]}


# -- parent side ------------------------------------------------------------------------------------------
def header(path: Path) -> dict[str, dict[str, Any]]:
    """A safetensors file's tensor entries (name -> dtype, shape, data_offsets), without torch."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        entries = json.loads(f.read(length))
    entries.pop("__metadata__", None)
    return entries


def _nbytes(entry: dict[str, Any]) -> int:
    begin, end = entry["data_offsets"]
    return end - begin


def shares(hf: Path, experts: int, ep: int) -> list[dict[str, Any]]:
    """Per EP rank: what it must read (dense tensors and its own experts, by shard) and what its floor writes."""
    per_rank = experts // ep
    plans = [{"rank": r, "read": {}, "write": [], "bytes": 0, "expert_bytes": 0} for r in range(ep)]
    dense = 0
    for shard in sorted(hf.glob("*.safetensors")):
        for name, entry in header(shard).items():
            match = EXPERT.search(name)
            owners = [int(match[1]) // per_rank] if match else list(range(ep))
            for r in owners:
                plans[r]["read"].setdefault(shard.name, []).append(name)
                plans[r]["bytes"] += _nbytes(entry)
                plans[r]["expert_bytes"] += _nbytes(entry) if match else 0
            if match:
                plans[owners[0]]["write"].append(name)
            else:  # replicated: the checkpoint stores it once; split the writing between the floor ranks
                plans[dense % ep]["write"].append(name)
                dense += 1
    return plans


def export_plan(hf: Path, shard_bytes: int) -> list[list[tuple[str, str, list[int]]]]:
    """The HF tensors in their order, cut into shards as the exporter's writer cuts them (greedy by size)."""
    shards: list[list[tuple[str, str, list[int]]]] = [[]]
    size = 0
    for shard in sorted(hf.glob("*.safetensors")):
        for name, entry in header(shard).items():
            n = _nbytes(entry)
            if size + n > shard_bytes and shards[-1]:
                shards.append([])
                size = 0
            shards[-1].append((name, entry["dtype"], entry["shape"]))
            size += n
    return shards
