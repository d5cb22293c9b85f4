"""The machine a benchmark ran on, for its table: CPU model, cores, L3 size (machines of one kind differ)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor() or platform.machine())  # fmt: skip
    l3 = Path("/sys/devices/system/cpu/cpu0/cache/index3/size")
    cache = f", L3 {l3.read_text().strip()}" if l3.is_file() else ""
    return f"{model}, {os.cpu_count()} cores{cache}"
