#!/usr/bin/env bash
# A separate venv for Megatron-Bridge, used only by benchmarks/bench_bridge.py.
#
#   bash benchmarks/setup_bridge_venv.sh [VENV]     # default /tmp/bridge-venv
#
# The bridge is not a dependency of plugtron and must never enter the project's
# .venv: it needs transformers<5 (the project uses 5.x). What goes in, in order:
#
# * torch==2.13.0 first and pinned: the CPU wheel this machine carries locally
#   (the same torch as the project). Unpinned, pip would fetch CUDA wheels (GBs).
# * megatron-core==0.16.1: the project's megatron-core; its own deps are only
#   numpy and packaging, so torch stays the one above.
# * transformers<5 (4.57.x, the newest 4.x): megatron-bridge 0.3.1 requires
#   transformers<5.0.0. Its deps (huggingface-hub<1, tokenizers, safetensors,
#   regex, requests, pyyaml, tqdm) are small and pull no torch.
# * megatron-bridge==0.3.1 with --no-deps: its declared deps include
#   transformer-engine, mamba-ssm, causal-conv1d, flash-linear-attention,
#   nvidia-resiliency-ext, wandb, mlflow, timm ... none of which the HF <-> megatron
#   conversion path needs on CPU.
# * what `import megatron.bridge` and the Llama conversion actually import,
#   found by trying: rich (progress bars, + markdown-it-py, pygments),
#   omegaconf (+ antlr4 runtime, pyyaml), einops (--no-deps).
# * not installed: transformer_engine and triton. bench_bridge.py puts small
#   import shims for them in place at run time (see its docstring).
set -euo pipefail

VENV="${1:-/tmp/bridge-venv}"
PY="${PYTHON:-python3.11}"

"$PY" -m venv "$VENV"
PIP=("$VENV/bin/pip" install --disable-pip-version-check -q)

"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" "megatron-core==0.16.1"
"${PIP[@]}" "transformers>=4.57,<5"
"${PIP[@]}" --no-deps "megatron-bridge==0.3.1"
"${PIP[@]}" rich omegaconf
"${PIP[@]}" --no-deps einops

# Refuse a venv that got a second torch or any GPU-only package.
"$VENV/bin/pip" list --disable-pip-version-check 2>/dev/null > "$VENV/pip-list.txt"
if grep -qiE '^(transformer[-_]engine|mamba[-_]ssm|causal[-_]conv1d|flash[-_]linear[-_]attention|triton|nvidia-)' "$VENV/pip-list.txt"; then
    echo "error: a GPU-only package got into $VENV:" >&2
    grep -iE '^(transformer|mamba|causal|flash|triton|nvidia)' "$VENV/pip-list.txt" >&2
    exit 1
fi
if [ "$(grep -ciE '^torch ' "$VENV/pip-list.txt")" != 1 ] || ! grep -qE '^torch +2\.13\.0\+cpu' "$VENV/pip-list.txt"; then
    echo "error: expected exactly torch 2.13.0+cpu in $VENV:" >&2
    grep -iE '^torch' "$VENV/pip-list.txt" >&2
    exit 1
fi
grep -iE '^(torch|megatron-core|megatron-bridge|transformers) ' "$VENV/pip-list.txt"
echo "bridge venv ready: $VENV/bin/python (run: .venv/bin/python benchmarks/bench_bridge.py --bridge-python $VENV/bin/python)"
