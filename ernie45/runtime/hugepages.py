"""Weights on 2 MB pages (Linux): a CPU decode step streams every weight once, and on 4 KB pages it pays a TLB
miss every 4 KB and the hardware prefetchers stop at each page boundary.

Reading matrices larger than the cache is faster from 2 MB pages, for a plain sum, for the AVX512-BF16 decode
kernel (`kernels`) and a little for torch's bf16 `F.linear` (docs/performance.md, "Measurements behind the
code"). Most kernels set transparent huge pages to `madvise`, so
torch's allocations stay on 4 KB pages unless asked: `collapse_process_memory` asks (MADV_HUGEPAGE) and moves
what is already there onto 2 MB pages (MADV_COLLAPSE, Linux 6.1+). Elsewhere it does nothing. The move copies
slowly (well under 1 GB/s), so the engine runs it in a background thread: the first steps of a
large model may still read 4 KB pages; `wait()` blocks until the move is done (the benchmarks call it).
A weight of a few MB gets its own mapping from the allocator, whose unaligned edges cannot be collapsed: `gather`
copies a model's tensors into one aligned arena first (the engine does both).

A quantized checkpoint's int4 tiles are already in the kernels' layout: `map_file` maps the file itself (no copy,
no anonymous memory; a second start finds it in the page cache) at a 2 MB-aligned address, and where the file
system keeps large folios (ext4 from Linux 6.16, xfs) the kernel maps its cached pages 2 MB at a time too.
`gather` leaves such tensors where they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import os
import sys
import threading
import time
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger("ernie45")
HUGE = 2 << 20
_TRIM_EVERY = 256 << 20  # bytes `gather` moves between handing the old copies back
MADV_WILLNEED, MADV_HUGEPAGE, MADV_COLLAPSE = 3, 14, 25
_moving: list[threading.Thread] = []
_files: dict[int, int] = {}  # start -> end of each file mapped by `map_file` and still mapped


@lru_cache(maxsize=1)
def _libc():
    """The C library (None where not on Linux): madvise for the pages, malloc_trim (glibc) for the heap."""
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


@lru_cache(maxsize=1)
def _madvise():
    libc = _libc()
    if libc is None:
        return None
    fn = libc.madvise
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


@lru_cache(maxsize=1)
def _mmap():
    """libc's mmap, munmap and mincore (None where not on Linux)."""
    libc = _libc()
    if libc is None:
        return None
    fn, unmap, mincore = libc.mmap, libc.munmap, libc.mincore
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                               ctypes.c_long], ctypes.c_void_p  # fmt: skip
    unmap.argtypes, unmap.restype = [ctypes.c_void_p, ctypes.c_size_t], ctypes.c_int
    mincore.argtypes, mincore.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p], ctypes.c_int
    return fn, unmap, mincore


def _malloc_trim():
    return getattr(_libc(), "malloc_trim", None)  # (glibc only)


def trim() -> None:
    """Hand the heap's freed pages back to the OS. glibc keeps freed blocks of a few MB in its heap (its mmap
    threshold grows with each large free), so a model whose weights were copied or quantized piece by piece held
    the old copies in its resident memory too: 2x the weights of a 21B model, more than the machine had."""
    fn = _malloc_trim()
    if fn is not None:
        fn(0)


def enabled() -> bool:
    """On unless `ERNIE45_HUGEPAGES=0` (for A/B measurements), not on Linux, or huge pages switched off."""
    return os.environ.get("ERNIE45_HUGEPAGES", "1") != "0" and _madvise() is not None and not _thp_off()


@lru_cache(maxsize=1)
def _thp_off() -> bool:
    setting = "/sys/kernel/mm/transparent_hugepage/enabled"
    off = os.path.exists(setting) and "[never]" in open(setting).read()
    if off:
        log.info("Transparent huge pages are switched off on this machine: weights stay on 4 KB pages")
    return off


def anonymous_regions(min_bytes: int) -> list[tuple[int, int]]:
    """(start, end) of this process's writable anonymous mappings of at least `min_bytes`, cut to 2 MB bounds."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 5 and fields[5] != "[heap]":  # file-backed, stack, vdso: left alone
                continue
            if not fields[1].startswith("rw"):
                continue
            lo, hi = (int(v, 16) for v in fields[0].split("-"))
            lo, hi = -(-lo // HUGE) * HUGE, hi // HUGE * HUGE
            if hi - lo >= min_bytes:
                out.append((lo, hi))
    return out


def collapse_process_memory(min_bytes: int = 8 << 20, background: bool = False) -> int:
    """Put the process's large anonymous mappings (the weights among them) on 2 MB pages; returns bytes moved
    (with `background`, 0: a thread does it, `wait()` joins it).

    Regions the kernel cannot collapse (no free huge pages, an old kernel) stay as they are.
    """
    if not enabled():
        return 0
    if background:
        thread = threading.Thread(target=collapse_process_memory, args=(min_bytes,), daemon=True, name="hugepages")
        _moving.append(thread)
        thread.start()  # madvise runs outside the GIL
        return 0
    madvise, moved, start = _madvise(), 0, time.perf_counter()
    for lo, hi in anonymous_regions(min_bytes):
        madvise(lo, hi - lo, MADV_HUGEPAGE)  # later faults in the region take 2 MB pages too
        if madvise(lo, hi - lo, MADV_COLLAPSE) == 0:
            moved += hi - lo
    if moved:
        log.info("%.0f MB of weights and buffers on 2 MB pages (%.1f s)", moved / 1e6, time.perf_counter() - start)
    return moved


def gather(module: torch.nn.Module, min_bytes: int = 1 << 20) -> int:
    """Move `module`'s large CPU tensors (parameters, buffers and tensor attributes such as a packed linear's
    plain weight) into one 2 MB-aligned arena on 2 MB pages, in place (`Tensor.set_`, so every holder of the same
    tensor object reads the new copy); returns the bytes moved (0 where huge pages are off).

    `collapse_process_memory` can only move whole 2 MB pages of a mapping, and the allocator gives each weight of
    a few MB its own mapping at a random offset, so part of such a weight stays on 4 KB pages and the matvecs
    read it slower than from the arena (docs/performance.md). Tensors that
    share a storage move together and keep sharing it. The arena's pages are asked for 2 MB before the copy
    touches them, so nothing has to be moved afterwards; resident memory grows by one tensor at a time (each old
    storage is freed when its last tensor has moved, unless a view not found here still holds it)."""
    if not enabled():
        return 0
    found: dict[int, list[torch.Tensor]] = {}
    seen: set[int] = set()
    for m in module.modules():
        attributes = (v for v in vars(m).values() if type(v) is torch.Tensor)
        for t in [*m._parameters.values(), *m._buffers.values(), *attributes]:
            if t is None or id(t) in seen or t.device.type != "cpu" or t.layout != torch.strided or t.is_quantized:
                continue  # (oneDNN's packed weights and quantized tensors have no plain storage to move)
            if t.untyped_storage().nbytes() < min_bytes or is_mapped_file(t):
                continue  # (a mapped file's pages stay where they are: copying them would double the memory)
            seen.add(id(t))
            found.setdefault(t.untyped_storage().data_ptr(), []).append(t)
    if not found:
        return 0
    sizes = {ptr: -(-ts[0].untyped_storage().nbytes() // 4096) * 4096 for ptr, ts in found.items()}
    total = sum(sizes.values())
    arena = torch.empty(total + HUGE, dtype=torch.uint8)
    start = (-arena.data_ptr()) % HUGE
    _madvise()(arena.data_ptr() + start, (arena.numel() - start) // HUGE * HUGE, MADV_HUGEPAGE)
    storage, offset, unreturned = arena.untyped_storage(), start, 0
    with torch.no_grad():
        for ptr, ts in found.items():
            old = ts[0].untyped_storage()
            arena[offset : offset + old.nbytes()].copy_(torch.empty(0, dtype=torch.uint8).set_(old))
            for t in ts:
                size = t.element_size()
                t.set_(storage, (offset + t.storage_offset() * size) // size, t.size(), t.stride())
            offset += sizes[ptr]
            unreturned += sizes[ptr]
            if unreturned > _TRIM_EVERY:  # the old copies back to the OS as we go, so resident memory stays at
                del old  # the weights plus _TRIM_EVERY
                trim()
                unreturned = 0
    trim()
    lo, length = arena.data_ptr() + start, (arena.numel() - start) // HUGE * HUGE
    if mapping_at(lo).get("AnonHugePages", 0) < 2048:  # the kernel had no free 2 MB page at fault time
        _madvise()(lo, length, MADV_COLLAPSE)  # (compacts memory to make some; fails quietly on old kernels)
        if mapping_at(lo).get("AnonHugePages", 0) < 2048:
            log.warning(
                "The kernel gave no 2 MB pages for %.0f MB of weights (memory too fragmented, or THP defrag off): "
                "they stay on 4 KB pages and decode reads them more slowly. `echo 1 > "
                "/proc/sys/vm/compact_memory` as root frees some; ERNIE45_HUGEPAGES=0 skips this step.",
                total / 1e6,
            )
    return total


class _Mapped:
    """Owns one mapping made by `map_file`: unmapped when the last tensor over it is gone."""

    def __init__(self, address: int, size: int) -> None:
        self.address, self.size = address, size
        _files[address] = address + size

    def __del__(self) -> None:
        _files.pop(self.address, None)
        calls = _mmap()
        if calls is not None:  # (None only while the interpreter shuts down)
            calls[1](self.address, self.size)


def map_file(path: str | Path, willneed: bool = True) -> torch.Tensor:
    """`path`'s bytes as a uint8 tensor over the file's pages in the page cache: copy on write (a write stays in
    this process and never reaches the file), 2 MB aligned and asked for 2 MB pages (see the module's docstring).
    willneed: start reading the whole file in the background now (a first decode step would otherwise fault it
    in 4 KB reads). Tensors made over it keep the mapping alive; `is_mapped_file` tells them apart.

    A file that another reader brought into the page cache in small pieces (a `cp`, a checksum, a plain read)
    stays in small pieces, which map 4 KB at a time: the int4 decode of a 21B model ran ~30% slower so
    (docs/performance.md). Where an eighth of the cached file is so, its cached pages are dropped and read again
    (one read from disk; pages other processes map stay), and the log says so."""
    size = os.path.getsize(path)
    calls = _mmap()
    with open(path, "rb") as f:
        if calls is None or size == 0:  # (not Linux: Python's own mapping, wherever it falls)
            return torch.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), dtype=torch.uint8)
        start, length = _map_aligned(f.fileno(), size, path)
        if enabled() and _cached_in_small_pieces(start, size):
            calls[1](start, length)
            os.fsync(f.fileno())  # (pages not yet written back are not dropped)
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            start, length = _map_aligned(f.fileno(), size, path)
            _madvise()(start, size, MADV_HUGEPAGE)
            if _cached(start, size).float().mean() < 0.25:
                log.info("%s was cached in small pieces, which map on 4 KB pages: reading it again from disk", path)
            else:  # (a file system that keeps its files in memory: nothing was dropped)
                log.info("%s is kept in pieces smaller than 2 MB that the page cache does not drop: its weights map "
                         "on 4 KB pages, which decode reads more slowly", path)  # fmt: skip
    if willneed:
        _madvise()(start, size, MADV_WILLNEED)  # (queues the reads and returns)
    buffer = (ctypes.c_uint8 * size).from_address(start)
    buffer.owner = _Mapped(start, length)  # lives as long as the buffer, which lives as long as the tensors
    return torch.frombuffer(buffer, dtype=torch.uint8)


def _map_aligned(fd: int, size: int, path) -> tuple[int, int]:
    """Map `fd` (copy on write) at a 2 MB boundary: (address, mapped length)."""
    mmap_, munmap, _ = _mmap()
    # reserve size + 2 MB of address space, then map the file over its first 2 MB boundary
    prot_none, anonymous_private, noreserve = 0, 0x22, 0x4000
    reserved = mmap_(None, size + HUGE, prot_none, anonymous_private | noreserve, -1, 0)
    if reserved in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), f"could not reserve {size + HUGE} bytes of address space for {path}")
    start = -(-reserved // HUGE) * HUGE
    read_write, private_fixed = 3, 0x12
    if mmap_(start, size, read_write, private_fixed, fd, 0) != start:
        munmap(reserved, size + HUGE)
        raise OSError(ctypes.get_errno(), f"could not map {path}")
    if start > reserved:  # hand back the reservation's unused head and tail
        munmap(reserved, start - reserved)
    end, reserved_end = start + -(-size // 4096) * 4096, reserved + size + HUGE
    if reserved_end > end:
        munmap(end, reserved_end - end)
    return start, end - start


def _cached(start: int, size: int) -> torch.Tensor:
    """Per whole 2 MB piece of the mapping at `start`: whether all its pages are in the page cache (`mincore`)."""
    mincore = _mmap()[2]
    pieces = size // HUGE
    pages = (ctypes.c_uint8 * max(1, pieces * HUGE // 4096))()
    if pieces == 0 or mincore(start, pieces * HUGE, pages) != 0:
        return torch.zeros(pieces, dtype=torch.bool)
    return (torch.frombuffer(pages, dtype=torch.uint8).view(pieces, HUGE // 4096) & 1).all(dim=1)


def _cached_in_small_pieces(start: int, size: int) -> bool:
    """Whether an eighth or more of the mapped file's wholly cached 2 MB pieces are cached as smaller pages, when a
    quarter of the file or more is cached at all: each such piece is touched once (a cached 2 MB page then maps
    whole, a small one 64 KB), and the mapping's 2 MB-mapped bytes are compared with the pieces touched."""
    _madvise()(start, size, MADV_HUGEPAGE)
    cached = _cached(start, size)
    whole = cached.nonzero().flatten().tolist()
    if not whole or len(whole) < len(cached) / 4:
        return False
    view = (ctypes.c_uint8 * size).from_address(start)
    sum(view[i * HUGE] for i in whole)  # (the faults map what is cached; nothing is read from disk)
    return mapping_at(start).get("FilePmdMapped", 0) * 1024 < len(whole) * HUGE * 7 // 8


def is_mapped_file(t: torch.Tensor) -> bool:
    """Whether `t`'s storage lies in a file mapped by `map_file`."""
    ptr = t.untyped_storage().data_ptr()
    return any(lo <= ptr < hi for lo, hi in _files.items())


def mapping_at(address: int) -> dict[str, int | str]:
    """The /proc/self/smaps entry of the mapping holding `address`: its kB counters (`AnonHugePages`, `Rss`, ...)
    and `VmFlags` ("hg" where MADV_HUGEPAGE was asked); empty where no mapping holds it or not on Linux."""
    path, out, inside = "/proc/self/smaps", {}, False
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and ":" not in head:
                if inside:
                    break
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                out["VmFlags"] = line.split(":", 1)[1].strip()
            elif inside and line.rstrip().endswith(" kB"):
                out[head.rstrip(":")] = int(line.split()[1])
    return out


def wait() -> None:
    """Block until the background moves started so far are done."""
    while _moving:
        _moving.pop().join()
