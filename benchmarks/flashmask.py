"""FlashMask on CPU: the block-sparse path vs SDPA with a dense boolean mask, side by side.

For each length and mask: forward time, the peak memory the call adds (each case in a fresh process),
and the mask's own bytes (FlashMask vectors vs the dense boolean matrix). On a GPU, FlexAttention too.

    python benchmarks/flashmask.py [--lengths 4096 16384 32768] [--heads 8] [--dim 64] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, re, sys, time, torch
from ernie45.attention import builders, flashmask_attention
def hwm():
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024
s, kind, backend, heads, dim, repeat, device = sys.argv[1:8]
s, heads, dim, repeat = int(s), int(heads), int(dim), int(repeat)
if kind == "causal_document":
    mask = builders.causal_document([s // 8] * 8)
elif kind == "shared_question":
    q = s // 4
    mask = builders.shared_question([(q, [(s - q) // 3] * 2 + [s - q - 2 * ((s - q) // 3)])])
else:
    mask = builders.sliding_window(s, 1024)
torch.manual_seed(0)
q = torch.randn(1, heads, s, dim, device=device)
k = torch.randn(1, heads // 4, s, dim, device=device)
v = torch.randn_like(k)
mask = mask.to(device)
def run():
    if backend == "sdpa-dense":
        dense = mask.to_dense()
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True)
    return flashmask_attention(q, k, v, mask, backend=backend)
base = hwm()
times = []
with torch.no_grad():
    for _ in range(repeat):
        t = time.perf_counter(); run(); times.append(time.perf_counter() - t)
print(json.dumps({"time": min(times), "peak": hwm() - base, "mask_bytes": mask.nbytes}))
"""


def case(s, kind, backend, args) -> dict:
    cmd = [
        sys.executable,
        "-c",
        CHILD,
        str(s),
        kind,
        backend,
        str(args.heads),
        str(args.dim),
        str(args.repeat),
        args.device,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        return {"error": r.stderr.strip().splitlines()[-1][:60]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768])
    ap.add_argument("--masks", nargs="+", default=["causal_document", "shared_question", "sliding_window"])
    ap.add_argument("--heads", type=int, default=8, help="query heads (key/value heads = heads / 4)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2, help="runs per case; the fastest is reported")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    ours = "blocksparse" if args.device == "cpu" else "triton"
    backends = ["sdpa-dense", ours] + (["flex"] if args.device != "cpu" else [])
    print(f"B=1, {args.heads} query / {args.heads // 4} kv heads, head dim {args.dim}, {args.device}, forward")
    head = f"{'tokens':>7} {'mask':16} " + " ".join(f"{b + ' s':>15} {b + ' MiB':>17}" for b in backends)
    print(head + f" {'speedup':>8} {'mask bytes':>11} {'dense bytes':>12}")
    for s in args.lengths:
        for kind in args.masks:
            res = {b: case(s, kind, b, args) for b in backends}
            cells = []
            for b in backends:
                r = res[b]
                cells.append(f"{r['time']:15.3f} {r['peak'] / 2**20:17.0f}" if "time" in r else f"{r['error']:>33}")
            fast = res[ours].get("time")
            dense = res["sdpa-dense"].get("time")
            speed = f"{dense / fast:7.1f}x" if fast and dense else "       -"
            mask_bytes = res[ours].get("mask_bytes", 0)
            print(f"{s:7d} {kind:16} " + " ".join(cells) + f" {speed:>8} {mask_bytes:11d} {s * s:12d}", flush=True)


if __name__ == "__main__":
    main()
