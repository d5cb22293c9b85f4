"""Peak memory of loading a 0.36B checkpoint: ernie45.load vs transformers' from_pretrained, side by side.

Writes a random ERNIE-4.5-0.3B checkpoint in the official -PT layout (bf16, as released) to a temp dir,
then loads it in fresh processes and prints each loader's peak RSS against the weights' size.

    python benchmarks/load_memory.py [--dtype bfloat16|float32]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

LOADERS = {
    "ernie45.load": "import ernie45, torch; m = ernie45.load(p, dtype=dt)",
    "transformers from_pretrained": "import transformers, torch; "
    "m = transformers.AutoModelForCausalLM.from_pretrained(p, dtype=dt)",
}
CHILD = r"""
import re, sys, time, torch
def hwm():  # peak RSS of this process in KiB (VmHWM resets at exec, unlike ru_maxrss)
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))
p, dt = sys.argv[1], getattr(torch, sys.argv[2])
base = hwm()
t = time.perf_counter()
{load}
took = time.perf_counter() - t
loaded = hwm()
with torch.no_grad():
    m(torch.arange(3, 11)[None])  # touch every weight (an mmap-backed loader pages the file in here)
n = sum(x.numel() * x.element_size() for x in m.parameters())
print(base, loaded, hwm(), n, took)
"""


def make_checkpoint(path: Path, dtype: torch.dtype) -> None:
    import ernie45
    from ernie45 import presets

    torch.manual_seed(0)
    config = presets.get("ernie-4.5-0.3b")
    with torch.device("cpu"):
        model = ernie45.Ernie45ForConditionalGeneration(config).to(dtype)
    model.config.dtype = dtype
    ernie45.export(model, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        make_checkpoint(Path(tmp), getattr(torch, args.dtype))
        print(f"wrote a random 0.36B checkpoint ({args.dtype}) in {time.perf_counter() - t:.1f}s")
        print("peak RSS above the process's after `import torch`, in MiB")
        print(f"{'loader':30} {'weights':>8} {'after load':>12} {'+ forward':>12} {'ratio':>6} {'load s':>6}")
        for name, load in LOADERS.items():
            out = subprocess.run(
                [sys.executable, "-c", CHILD.format(load=load), tmp, args.dtype],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            base, loaded, peak, nbytes = (int(x) for x in out[:4])
            took = float(out[4])
            w = nbytes / 2**20
            row = f"{name:30} {w:8.0f} {(loaded - base) / 1024:12.0f} {(peak - base) / 1024:12.0f}"
            print(f"{row} {(peak - base) / 1024 / w:6.2f} {took:6.2f}")


if __name__ == "__main__":
    main()
