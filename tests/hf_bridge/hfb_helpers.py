"""Tiny random HF checkpoints for the HF bridge tests (made from configs, never downloaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GPT2LMHeadModel")
#: Parity cases: (name, architecture, tied, vocab). Odd vocab sizes force megatron's padding.
CASES = [
    ("llama", "LlamaForCausalLM", False, 100),
    ("mistral", "MistralForCausalLM", False, 97),
    ("qwen2", "Qwen2ForCausalLM", False, 100),
    ("qwen3-tied", "Qwen3ForCausalLM", True, 101),
    ("gpt2-tied", "GPT2LMHeadModel", True, 99),
]


def hf_config(arch: str, *, tied: bool = False, vocab: int = 100, layers: int = 4) -> Any:
    import transformers

    if arch == "GPT2LMHeadModel":
        return transformers.GPT2Config(n_embd=64, n_layer=layers, n_head=4, vocab_size=vocab, n_positions=64,
                                       tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0)
    extra = {"sliding_window": None} if arch == "MistralForCausalLM" else {}
    if arch == "Qwen3ForCausalLM":
        extra["head_dim"] = 16
    cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    return cls(hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64, tie_word_embeddings=tied, **extra)


def make_hf(directory: Path, arch: str = "LlamaForCausalLM", *, tied: bool = False, vocab: int = 100,
            layers: int = 4, dtype: str = "float32", seed: int = 0, tokenizer: bool = False) -> Path:
    """Save a randomly initialised model (weights ~ N(0, 0.2): logits far from zero) as safetensors."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(hf_config(arch, tied=tied, vocab=vocab, layers=layers))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    model.to(getattr(torch, dtype)).save_pretrained(directory)
    if tokenizer:
        (directory / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    return directory


def read_all(directory: Path) -> dict[str, Any]:
    """Every tensor of an HF checkpoint directory (single file or sharded)."""
    from safetensors.torch import load_file

    tensors: dict[str, Any] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def bit_exact(a: Path, b: Path) -> list[str]:
    """Names whose tensors differ in presence, dtype or any bit (empty list: identical)."""
    import torch

    left, right = read_all(a), read_all(b)
    names = sorted(set(left) | set(right))
    return [n for n in names if n not in left or n not in right or left[n].dtype != right[n].dtype
            or not torch.equal(left[n], right[n])]


def rewrite(directory: Path, change: Any) -> None:
    """Apply ``change(tensors)`` to a single-file checkpoint and save it again."""
    from safetensors.torch import save_file

    path = directory / "model.safetensors"
    tensors = dict(read_all(directory))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def run_scenarios(scenarios: list[dict[str, Any]], out: Path, *, timeout: float = 600) -> tuple[list[dict[str, Any]], str]:
    """Run ``hfb_mp_worker.py``'s ``scenarios`` in one two-rank torchrun launch (gloo, one thread each).

    ``out`` is the worker's output folder (created). Returns (the results in scenario
    order, rank 0's stdout); a failed launch fails the calling test with the last output.
    """
    import json
    import os
    import subprocess
    import sys

    out.mkdir(parents=True, exist_ok=True)
    result_file = out / "results.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=0",
               str(Path(__file__).with_name("hfb_mp_worker.py")), "--scenarios", json.dumps(scenarios),
               "--out", str(out), "--results", str(result_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return json.loads(result_file.read_text()), proc.stdout


def expert_bytes(directory: Path) -> dict[int, int]:
    """Checkpoint bytes of each routed expert (all layers, all projections), by global expert index."""
    import re

    from safetensors import safe_open

    per: dict[int, int] = {}
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        for name in f.keys():
            found = re.search(r"\.experts\.(\d+)\.", name)
            if found:
                t = f.get_tensor(name)
                per[int(found.group(1))] = per.get(int(found.group(1)), 0) + t.numel() * t.element_size()
    return per


def record_shard_writers(monkeypatch: Any) -> list[str]:
    """The name of the thread that writes each shard, in order (the real write still happens)."""
    import threading

    from plugtron_hf_bridge import safetensors_io

    threads: list[str] = []
    real = safetensors_io.write_file

    def recording(path: Any, tensors: Any, metadata: Any) -> None:
        threads.append(threading.current_thread().name)
        real(path, tensors, metadata)

    monkeypatch.setattr(safetensors_io, "write_file", recording)
    return threads
