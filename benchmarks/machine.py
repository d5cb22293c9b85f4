"""The machine a benchmark ran on, for its table: CPU model, cores, L3 size (machines of one kind differ)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

from ernie45.runtime import hugepages


def cpu_name() -> str:
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor() or platform.machine())  # fmt: skip
    l3 = Path("/sys/devices/system/cpu/cpu0/cache/index3/size")
    cache = f", L3 {l3.read_text().strip()}" if l3.is_file() else ""
    return f"{model}, {os.cpu_count()} cores{cache}"


def read_bandwidth(gib: float = 1.0, repeat: int = 5) -> tuple[float, float]:
    """Bytes/s of a streaming read (a sum over a large fp32 tensor) on 4 KB pages and, where the kernel moves it,
    on 2 MB pages (the bound uses the faster: what the machine can do)."""
    x = torch.ones(int(gib * (1 << 30)) // 4)

    def speed() -> float:
        x.sum()
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            x.sum()
            best = min(best, time.perf_counter() - t)
        return x.numel() * 4 / best

    small = speed()
    return small, speed() if hugepages.collapse_process_memory() else small
