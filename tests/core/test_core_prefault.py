"""plugtron.runtime.prefault: fresh memory committed in one call, contents untouched."""

from __future__ import annotations

import mmap
import sys

import pytest
import torch

from plugtron.runtime import prefault


def _resident_kb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_POPULATE_WRITE is Linux's")
def test_populate_commits_fresh_pages_once_per_storage_without_changing_contents() -> None:
    # 64 MiB of a new mapping: untouched, so not resident yet (torch.empty may reuse memory a test freed before)
    fresh = torch.frombuffer(mmap.mmap(-1, 64 * 2**20), dtype=torch.uint8)
    written = torch.arange(1000, dtype=torch.float32)
    before = _resident_kb()
    done = prefault.populate([fresh, fresh[10:], written, torch.empty(3, 4, device="meta")])
    if done == 0:
        pytest.skip("this kernel has no MADV_POPULATE_WRITE (Linux 5.14)")
    assert done == fresh.nbytes  # once per storage; the 4 kB tensor is below a page, the meta one skipped
    assert _resident_kb() - before >= 60 * 1024  # the pages are resident now, before any write
    assert torch.equal(written, torch.arange(1000, dtype=torch.float32))


def test_populate_is_a_no_op_where_the_call_is_missing(monkeypatch) -> None:
    monkeypatch.setattr(prefault, "_madvise", False)
    assert prefault.populate([torch.empty(2**20, dtype=torch.uint8)]) == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_POPULATE_WRITE is Linux's")
def test_populate_over_threads_commits_every_storage_once() -> None:
    fresh = [torch.frombuffer(mmap.mmap(-1, n * 2**20), dtype=torch.uint8) for n in (9, 1, 4, 4, 2)]  # 20 MiB, untouched
    before = _resident_kb()
    done = prefault.populate(fresh + [fresh[2][5:]], threads=3)
    if done == 0:
        pytest.skip("this kernel has no MADV_POPULATE_WRITE (Linux 5.14)")
    assert done == 20 * 2**20
    assert _resident_kb() - before >= 19 * 1024


def test_storages_are_split_into_groups_of_about_equal_bytes() -> None:
    spans = [(0, 9), (100, 1), (200, 4), (300, 4), (400, 2)]
    groups = prefault._balanced(spans, threads=2)
    assert sorted(sum(size for _, size in group) for group in groups) == [10, 10]
    assert sorted(span for group in groups for span in group) == spans
    assert prefault._balanced(spans, threads=1) == [sorted(spans, key=lambda s: -s[1])]
    assert len(prefault._balanced(spans[:2], threads=8)) == 2  # never more groups than storages
