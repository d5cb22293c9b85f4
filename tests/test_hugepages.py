"""Weights onto 2 MB pages: the process's large anonymous mappings are collapsed, and the switch turns it off."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ernie45.model import hugepages


def _anon_huge_kb() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage/enabled").is_file(), reason="no THP here")
def test_collapse_moves_a_large_tensor_onto_huge_pages(monkeypatch):
    setting = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    if "[never]" in setting:
        pytest.skip("transparent huge pages are switched off on this machine")
    x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MB, touched: on 4 KB pages under THP=madvise
    monkeypatch.setenv("ERNIE45_HUGEPAGES", "0")
    assert hugepages.collapse_process_memory() == 0
    monkeypatch.delenv("ERNIE45_HUGEPAGES")
    before = _anon_huge_kb()
    moved = hugepages.collapse_process_memory()
    if moved == 0:
        pytest.skip("the kernel collapsed nothing (no MADV_COLLAPSE before Linux 6.1, or no free huge pages)")
    assert moved >= 32 << 20 and _anon_huge_kb() >= 32 << 10
    if "[madvise]" in setting:  # (under THP=always the tensor may have been on huge pages from the start)
        assert _anon_huge_kb() - before >= 32 << 10
    assert int(x.sum()) == 64 << 20  # the data survives the move
    y = torch.ones(64 << 20, dtype=torch.uint8)
    before = _anon_huge_kb()
    assert hugepages.collapse_process_memory(background=True) == 0
    hugepages.wait()
    if "[madvise]" in setting:
        assert _anon_huge_kb() - before >= 32 << 10
    assert int(y.sum()) == 64 << 20
