"""Peak memory of loading a checkpoint: ernie45.load vs transformers' from_pretrained, side by side; with
--quantization, loading then quantizing vs quantizing each layer while it loads (what `LLM(dir,
quantization=...)` and `ernie45 quantize` do).

Writes a random checkpoint in the official -PT layout (bf16, as released) to a temp dir, then loads it in fresh
processes and prints each loader's peak RSS against the weights' size on disk.

    python benchmarks/load_memory.py [--dtype bfloat16|float32]
    python benchmarks/load_memory.py --shape ernie-4.5-21b-a3b --layers 2 --quantization int4
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import cpu_name  # noqa: E402

LOADERS = {
    "ernie45.load": "import ernie45, torch; m = ernie45.load(p, dtype=dt)",
    "transformers from_pretrained": "import transformers, torch; "
    "m = transformers.AutoModelForCausalLM.from_pretrained(p, dtype=dt)",
}
QUANTIZED = {
    "load, then quantize": "import ernie45, torch; from ernie45.runtime.prepare import Plan, prepare; "
    "m = ernie45.load(p, dtype=torch.float32); prepare(m, Plan(quantization=q))",
    "quantize each layer as it loads": "import ernie45, torch; "
    "from ernie45.runtime.prepare import Plan, QuantizingLoader, prepare; "
    "m = ernie45.load(p, dtype=torch.float32, on_layer=QuantizingLoader(q)); m.quantized_while_loading = True; "
    "prepare(m, Plan(quantization=q))",
}
CHILD = r"""
import re, sys, time, torch
def hwm():  # peak RSS of this process in KiB (VmHWM resets at exec, unlike ru_maxrss)
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))
p, dt, q = sys.argv[1], getattr(torch, sys.argv[2]), sys.argv[3]
base = hwm()
t = time.perf_counter()
{load}
took = time.perf_counter() - t
loaded = hwm()
with torch.no_grad():
    m(torch.arange(3, 11)[None])  # touch every weight (an mmap-backed loader pages the file in here)
n = sum(x.numel() * x.element_size() for x in [*m.parameters(), *m.buffers()])
print(base, loaded, hwm(), n, took)
"""


def make_checkpoint(path: Path, dtype: torch.dtype, shape: str = "ernie-4.5-0.3b", layers: int | None = None) -> None:
    import ernie45
    from ernie45 import presets

    torch.manual_seed(0)
    config = presets.get(shape, **({"num_hidden_layers": layers} if layers else {}))
    with torch.device("cpu"):
        model = ernie45.Ernie45ForConditionalGeneration(config).to(dtype)
    model.config.dtype = dtype
    ernie45.export(model, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--shape", default="ernie-4.5-0.3b", help="a preset (ernie45.presets.names())")
    ap.add_argument("--layers", type=int, help="fewer decoder layers than the preset (the 21B's 28 take 44 GB)")
    ap.add_argument("--quantization", choices=["int8", "int4", "int4-g64", "int4-g128"],
                    help="compare quantizing loads instead of float ones")  # fmt: skip
    args = ap.parse_args()
    print(f"CPU: {cpu_name()}")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        make_checkpoint(Path(tmp), getattr(torch, args.dtype), args.shape, args.layers)
        disk = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors")) / 2**20
        print(
            f"wrote a random {args.shape} checkpoint ({args.layers or 'all'} layers, {args.dtype}, {disk:.0f} MiB) "
            f"in {time.perf_counter() - t:.1f}s"
        )
        print("peak RSS above the process's after `import torch`, in MiB; 'model' is what the loaded model holds")
        print(f"{'loader':32} {'model':>8} {'after load':>12} {'+ forward':>12} {'/ file':>6} {'load s':>6}")
        for name, load in (QUANTIZED if args.quantization else LOADERS).items():
            out = subprocess.run(
                [sys.executable, "-c", CHILD.format(load=load), tmp, args.dtype, args.quantization or "-"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            base, loaded, peak, nbytes = (int(x) for x in out[:4])
            took = float(out[4])
            w = nbytes / 2**20
            row = f"{name:32} {w:8.0f} {(loaded - base) / 1024:12.0f} {(peak - base) / 1024:12.0f}"
            print(f"{row} {(peak - base) / 1024 / disk:6.2f} {took:6.2f}")


if __name__ == "__main__":
    main()
