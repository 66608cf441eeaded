"""Run under torchrun (2 gloo ranks): every multi-rank HF bridge scenario in one launch.

Kinds of scenario (a JSON list on the command line), each result one JSON dict:

* ``convert``: import an HF checkpoint at a layout, logit parity against
  transformers (``seq`` tokens per sequence, the verifier's default when
  absent), export back to HF and compare bit for bit;
* ``ckpt``: import at one layout, save a megatron distributed checkpoint,
  load it at another layout, compare the logits of both models and export
  the reloaded one bit-exactly;
* ``cli``: ``plugtron.cli.main(argv)`` on both ranks (the path ``plugtron
  convert --tp 2`` takes after torchrun re-launched it).
* ``moe``: a MoE checkpoint at an expert layout (``tp``, ``ep``, ``etp``):
  parity, bytes read per rank, bit-exact export.

Module level imports stay light: megatron's checkpoint writer starts a spawn
process that re-imports this file.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any


def _layout(spec: dict[str, Any]) -> dict[str, Any]:
    return {"tp": spec.get("tp", 1), "pp": spec.get("pp", 1), "vp": spec.get("vp")}


def _parallel(spec: dict[str, Any]) -> Any:
    from plugtron.runtime.parallel import initialize_parallel

    layout = _layout(spec)
    return initialize_parallel(layout["tp"], layout["pp"], layout["vp"], timeout_s=120)


def _barrier_compare(rank: int, src: Path, dst: Path) -> list[str] | None:
    import torch.distributed as dist

    from hfb_helpers import bit_exact

    dist.barrier()
    return bit_exact(src, dst) if rank == 0 else None


def run_convert(s: dict[str, Any], out: Path, pm: Any) -> dict[str, Any]:
    from plugtron_hf_bridge.exporter import export_hf
    from plugtron_hf_bridge.importer import import_hf
    from plugtron_hf_bridge.verify import verify

    parallel = _parallel(s)
    imported = import_hf(s["src"], **_layout(s), pm=pm, parallel=parallel)
    report = verify(s["src"], imported=imported, seq=s.get("seq"))
    dst = out / s["name"].replace(" ", "_")
    export_hf(imported.built, imported.plan.config, imported.plan.adapter, dst,
              source_hf_config=imported.plan.hf_config, max_shard_bytes=s.get("shard", 10**9))
    return {"diff": report.max_abs_diff, "cosine": report.cosine, "top1": report.top1_agreement,
            "scale": report.logit_scale, "mismatched": _barrier_compare(parallel.rank, Path(s["src"]), dst),
            "params_dtype": str(imported.plan.config.params_dtype)}


def run_ckpt(s: dict[str, Any], out: Path, pm: Any) -> dict[str, Any]:
    from plugtron_hf_bridge.adapter import load_adapter
    from plugtron_hf_bridge.checkpoint import bridge_meta, load_megatron, save_megatron
    from plugtron_hf_bridge.exporter import export_hf
    from plugtron_hf_bridge.importer import import_hf
    from plugtron_hf_bridge.verify import megatron_logits, sample_tokens

    name = s["name"].replace(" ", "_")
    imported = import_hf(s["src"], **_layout(s["save"]), pm=pm, parallel=_parallel(s["save"]))
    plan = imported.plan
    tokens = sample_tokens(plan.config.vocab_size, 2, 16)
    before = megatron_logits(imported.built, tokens)
    save_megatron(out / f"{name}-meg", imported.built, plan.config, meta=bridge_meta(plan.architecture, plan.hf_config, plan.config))
    del imported
    loaded = load_megatron(out / f"{name}-meg", **_layout(s["load"]), pm=pm, parallel=_parallel(s["load"]))
    after = megatron_logits(loaded.built, tokens)
    dst = out / f"{name}-hf"
    export_hf(loaded.built, loaded.config, load_adapter(loaded.meta["architecture"], pm), dst,
              source_hf_config=loaded.meta["hf_config"])
    rank = loaded.built.context.parallel.rank
    diff = float((before - after).abs().max()) if rank == 0 else None
    return {"logits_diff": diff, "mismatched": _barrier_compare(rank, Path(s["src"]), dst)}


def run_cli(s: dict[str, Any], out: Path, pm: Any) -> dict[str, Any]:
    from plugtron.cli import main

    argv = [str(out / a[len("OUT/"):]) if a.startswith("OUT/") else a for a in s["argv"]]
    code = main(argv)
    result: dict[str, Any] = {"code": code}
    if s.get("compare"):
        import torch.distributed as dist

        dist.barrier()
        a, b = (Path(p.replace("OUT/", f"{out}/")) for p in s["compare"])
        from hfb_helpers import bit_exact

        result["mismatched"] = bit_exact(a, b) if dist.get_rank() == 0 else None
    return result


def run_moe(s: dict[str, Any], out: Path, pm: Any) -> dict[str, Any]:
    """``moe``: a MoE checkpoint at an expert layout (``tp``, ``ep``, ``etp``): logit parity, bytes each rank
    read (with its expert-parallel rank), a bit-exact export."""
    from megatron.core import parallel_state

    from plugtron.runtime.parallel import initialize_parallel
    from plugtron_hf_bridge.exporter import export_hf
    from plugtron_hf_bridge.importer import import_hf
    from plugtron_hf_bridge.verify import verify

    layout = {"tp": s.get("tp", 1), "ep": s.get("ep", 1), "etp": s.get("etp")}
    ctx = initialize_parallel(layout["tp"], 1, None, ep=layout["ep"], etp=layout["etp"], timeout_s=120)
    imported = import_hf(s["src"], **layout, pm=pm, parallel=ctx)
    report = verify(s["src"], imported=imported, seq=s.get("seq"))
    dst = out / s["name"].replace(" ", "_")
    export_hf(imported.built, imported.plan.config, imported.plan.adapter, dst, source_hf_config=imported.plan.hf_config)
    return {"diff": report.max_abs_diff, "cosine": report.cosine, "top1": report.top1_agreement,
            "scale": report.logit_scale, "layout": report.layout, "reads": imported.reads,
            "ep_ranks": _all_ranks(parallel_state.get_expert_model_parallel_rank()),
            "mismatched": _barrier_compare(ctx.rank, Path(s["src"]), dst)}


def run_quant(s: dict[str, Any], out: Path, pm: Any) -> dict[str, Any]:
    """``quant``: an FP8 checkpoint (``src``, architecture from ``test_quantized_import``) at ``tp``, in float32:
    parity against transformers on ``reference`` (its dequantised values), bytes each rank read, and its export
    equal to ``reference`` bit for bit."""
    from test_quantized_import import Plugin

    from plugtron_hf_bridge.exporter import export_hf
    from plugtron_hf_bridge.importer import import_hf
    from plugtron_hf_bridge.verify import verify

    pm.register(Plugin(), name="fp8-llama-test")
    parallel = _parallel(s)
    imported = import_hf(s["src"], **_layout(s), dtype="float32", pm=pm, parallel=parallel)
    report = verify(s["reference"], imported=imported)
    dst = out / s["name"].replace(" ", "_")
    export_hf(imported.built, imported.plan.config, imported.plan.adapter, dst, source_hf_config=imported.plan.hf_config)
    scales = [n for n, _ in imported.built.chunks[0].named_parameters() if "scale" in n]
    return {"diff": report.max_abs_diff, "top1": report.top1_agreement, "bytes": [r["bytes"] for r in imported.reads],
            "checkpoint_bytes": (Path(s["src"]) / "model.safetensors").stat().st_size, "scales_loaded": scales,
            "mismatched": _barrier_compare(parallel.rank, Path(s["reference"]), dst)}


def _all_ranks(value: Any) -> list[Any]:
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def main() -> int:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenarios", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--results", required=True)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    import torch.distributed as dist

    from plugtron.manager import PlugtronPluginManager

    pm = PlugtronPluginManager()
    kinds = {"convert": run_convert, "ckpt": run_ckpt, "cli": run_cli, "moe": run_moe,
             "quant": run_quant}
    results = []
    for scenario in json.loads(args.scenarios):
        # No try/except: a failure on one rank must end the job (torchrun stops the peer),
        # not leave the other rank waiting in a collective.
        result = kinds[scenario["kind"]](scenario, Path(args.out), pm)
        results.append({"name": scenario["name"], **result})
    if dist.get_rank() == 0:
        Path(args.results).write_text(json.dumps(results, indent=2))
    dist.barrier()
    from plugtron.runtime.parallel import destroy_parallel

    destroy_parallel()  # not left to the interpreter's exit, where gloo's threads can abort a rank
    return 0


if __name__ == "__main__":
    sys.exit(main())
