"""Weights onto 2 MB pages: the process's large anonymous mappings are collapsed, and the switch turns it off."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from ernie45.runtime import hugepages


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
    # the process's huge-page total is what is measured: settle what earlier tests left (an engine's background
    # collapse still running, a dropped model's arena not yet freed) so only this test's moves change it
    gc.collect()
    hugepages.wait()
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
    gc.collect()
    before = _anon_huge_kb()
    assert hugepages.collapse_process_memory(background=True) == 0
    hugepages.wait()
    if "[madvise]" in setting:
        assert _anon_huge_kb() - before >= 32 << 10
    assert int(y.sum()) == 64 << 20


def test_gather_puts_a_modules_tensors_in_one_huge_page_arena_and_keeps_their_sharing(monkeypatch):
    torch.manual_seed(0)
    lin, head = torch.nn.Linear(1024, 1536, bias=False), torch.nn.Linear(1024, 1536, bias=False)
    head.weight = lin.weight  # tied: one Parameter in two modules
    lin.register_buffer("table", torch.randn(700, 1024))
    lin.plain = lin.weight.data  # a tensor attribute on the parameter's storage (as PackedLinear's plain weight)
    lin.small = torch.randn(8)  # under the size floor: left where it is
    model = torch.nn.Sequential(lin, head)
    want = {k: v.clone() for k, v in [("w", lin.weight), ("table", lin.table), ("small", lin.small)]}
    small_at = lin.small.data_ptr()
    monkeypatch.setenv("ERNIE45_HUGEPAGES", "0")
    assert hugepages.gather(model) == 0
    monkeypatch.delenv("ERNIE45_HUGEPAGES")
    moved = hugepages.gather(model)
    assert moved >= lin.weight.numel() * 4 + lin.table.numel() * 4
    assert torch.equal(lin.weight, want["w"]) and torch.equal(lin.table, want["table"])
    assert torch.equal(lin.small, want["small"]) and lin.small.data_ptr() == small_at
    assert head.weight is lin.weight and lin.plain.data_ptr() == lin.weight.data_ptr()  # still one storage
    assert lin.weight.untyped_storage().data_ptr() == lin.table.untyped_storage().data_ptr()  # one arena
    assert isinstance(lin.weight, torch.nn.Parameter)
    setting = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if setting.is_file() and "[never]" not in setting.read_text():
        arena = hugepages.mapping_at(lin.weight.data_ptr())
        assert "hg" in str(arena["VmFlags"]).split()  # the arena was asked for 2 MB pages before the copy
        probe = torch.empty(8 << 20, dtype=torch.uint8)  # can this kernel give 2 MB pages at all right now?
        lo = -(-probe.data_ptr() // hugepages.HUGE) * hugepages.HUGE
        hugepages._madvise()(lo, 4 << 20, hugepages.MADV_HUGEPAGE)
        probe.fill_(1)
        if hugepages.mapping_at(lo).get("AnonHugePages", 0) >= 2048:  # it can: so must the arena have them
            assert arena["AnonHugePages"] >= 2048
    x = torch.randn(3, 1024)
    assert torch.equal(lin(x), torch.nn.functional.linear(x, want["w"]))  # the module computes from the arena


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.skipif(hugepages._malloc_trim() is None, reason="glibc's malloc_trim is not here")
def test_gather_hands_the_old_copies_back_so_resident_memory_does_not_double():
    """Weights of a few MB each live in glibc's heap, which kept their freed old copies: a 21B model's int4
    weights (14 GB) then needed 28 GB while they moved into the arena, and the load was killed."""
    torch.empty(16 << 20, dtype=torch.uint8).fill_(1)  # (freeing a 16 MB block sends 4 MB ones to the heap)
    model = torch.nn.ModuleList(torch.nn.Linear(1024, 1024, bias=False) for _ in range(96))  # 96 x 4 MB
    for lin in model:  # a small tensor after each weight, left in place (as an int4 linear's scales): freed
        lin.register_buffer("scale", lin.weight[:, :200].clone())  # old copies cannot fall off the heap's top
    gc.collect()
    hugepages.wait()
    hugepages.trim()
    before = _rss_mb()
    moved = hugepages.gather(model)
    assert moved >= 96 * 4 << 20
    assert _rss_mb() - before < 64  # the 384 MB moved, the old copies returned (not +384 MB)


def _file_pmd_kb(t: torch.Tensor) -> int:
    return int(hugepages.mapping_at(t.data_ptr()).get("FilePmdMapped", 0))


def test_a_mapped_file_lands_on_2mb_pages_even_when_another_reader_cached_it_in_small_pieces(tmp_path, caplog):
    """A file written 2 MB at a time maps onto 2 MB pages; the same bytes written 8 KB at a time sit in the page
    cache as 4 KB pages, which `map_file` notices, drops and reads again, saying so: the mapping ends on 2 MB
    pages too, and its bytes are the file's."""
    data = torch.randint(0, 256, (64 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    big, small = tmp_path / "big.bin", tmp_path / "small.bin"
    raw = data.numpy().tobytes()
    with open(big, "wb") as f:
        for i in range(0, len(raw), 2 << 20):
            f.write(raw[i : i + (2 << 20)])
    mapped = hugepages.map_file(big)
    assert torch.equal(mapped, data)
    if not hugepages.enabled() or _file_pmd_kb(mapped) < 32 << 10:
        pytest.skip("this kernel or file system maps no file pages 2 MB at a time (ext4 before Linux 6.16)")
    with open(small, "wb") as f:
        for i in range(0, len(raw), 8192):
            f.write(raw[i : i + 8192])
    with caplog.at_level("INFO", logger="ernie45"):
        again = hugepages.map_file(small)
    assert "cached in small pieces" in caplog.text
    assert torch.equal(again, data)
    assert _file_pmd_kb(again) >= 48 << 10
    caplog.clear()
    with caplog.at_level("INFO", logger="ernie45"):
        third = hugepages.map_file(small)  # now cached 2 MB at a time: nothing to do
    assert "cached in small pieces" not in caplog.text and torch.equal(third, data)


def test_a_file_kept_in_memory_in_small_pages_is_mapped_as_it_is_and_said_so(caplog):
    """A file on tmpfs (its pages are the file: nothing to drop and read again) maps as it is, and the log says its
    weights stay on 4 KB pages."""
    shm, setting = Path("/dev/shm"), Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
    if not hugepages.enabled() or not shm.is_dir() or not setting.is_file() or "[never]" not in setting.read_text():
        pytest.skip("needs /dev/shm on 4 KB pages (shmem huge pages off)")
    data = torch.randint(0, 256, (16 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    path = shm / f"ernie45-test-{id(data)}.bin"
    try:
        path.write_bytes(data.numpy().tobytes())
        with caplog.at_level("INFO", logger="ernie45"):
            mapped = hugepages.map_file(path)
        assert torch.equal(mapped, data)
        assert "the page cache does not drop" in caplog.text and "reading it again" not in caplog.text
    finally:
        path.unlink(missing_ok=True)
