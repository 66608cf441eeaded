"""Every architecture case (``arch_cases``): TP=1 logits parity against transformers, a bit-exact
round trip HF -> megatron -> HF, and the config translated both ways."""

from __future__ import annotations


import pytest

from arch_cases import all_cases, save_case
from hfb_helpers import bit_exact

CASES = all_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_tp1_parity_and_bit_exact_round_trip(tmp_path, plugtron_single_rank, pm, case) -> None:
    from plugtron_hf_bridge.exporter import export_hf
    from plugtron_hf_bridge.importer import import_hf
    from plugtron_hf_bridge.verify import verify

    src = save_case(tmp_path / "hf", case)
    imported = import_hf(src, pm=pm, parallel=plugtron_single_rank)
    report = verify(src, imported=imported, seq=case.seq)
    assert report.max_abs_diff <= 1e-4 and report.top1_agreement == 1.0 and report.logit_scale > 0.2, report
    export_hf(imported.built, imported.plan.config, imported.plan.adapter, tmp_path / "out",
              source_hf_config=imported.plan.hf_config)
    assert bit_exact(src, tmp_path / "out") == []


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_config_round_trip_through_megatron_fields(pm, case) -> None:
    """HF config -> megatron fields -> HF config (through transformers' class) -> the same fields."""
    from arch_cases import config_class
    from plugtron_hf_bridge.adapter import load_adapter

    adapter = load_adapter(case.architecture, pm)
    original = config_class(case.architecture)(**case.config).to_dict()
    fields = adapter.to_fields(original)
    exported = adapter.fields_to_hf(fields, passthrough=original)
    assert exported["architectures"] == [case.architecture]
    assert adapter.to_fields(exported) == fields


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_the_source_config_describes_the_imported_model(tmp_path, pm, case) -> None:
    """Export then writes the source config.json back as it was (only the dtype updated)."""
    from plugtron_hf_bridge.importer import plan_import

    plan = plan_import(save_case(tmp_path / "hf", case), pm=pm)
    assert plan.adapter.describes(plan.config, plan.hf_config)
