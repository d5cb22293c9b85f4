"""Decode attention over a long KV cache: the runtime's one-query kernel against torch's SDPA, side by side.

    python benchmarks/attention.py                       # 0.3B heads (16 query, 2 KV, dim 128), bf16
    python benchmarks/attention.py --heads 20 --kv-heads 4 --lengths 512,16384

One decode step's attention for one layer, batch 1, best of --repeat calls after warm-up. GB/s = the cache's
keys and values read once / time; "% bw" against the machine's read bandwidth (the bound a decode step at depth
approaches when attention is read at bandwidth). At 16K cached tokens the 0.3B model reads 18 layers x 8 MB of
cache a step beside its 0.7 GB of weights, so this kernel is a decode step's other half there.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from machine import cpu_name, read_bandwidth

from ernie45.runtime import kernels


def best(fn, repeat: int) -> float:
    """The fastest of `repeat` calls after three warm ones. (Not decode.py's `timed`: its gc.collect before each
    call evicts the cache a 25-us call would otherwise find warm, and made 512 cached tokens time 10x slower.)"""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--lengths", default="512,4096,16384")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.heads % args.kv_heads or not 1 <= args.heads // args.kv_heads <= 16 or args.dim % 16 or args.dim > 256:
        p.error("the kernel takes 1-16 query heads per KV head (--heads a multiple of --kv-heads) and --dim a "
                "multiple of 16 up to 256")  # fmt: skip
    try:
        lengths = [int(x) for x in args.lengths.split(",")]
    except ValueError:
        p.error(f"--lengths: whole numbers separated by commas, e.g. 512,4096 (got {args.lengths!r})")
    if min(lengths) < 1:
        p.error("--lengths: each at least 1")
    torch.set_num_threads(args.threads)
    why = kernels.unavailable()
    if why:
        raise SystemExit(f"the runtime's kernels are off here: {why}")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    bw = max(read_bandwidth())
    g = torch.Generator().manual_seed(0)
    print(f"CPU: {cpu_name()}; read bandwidth {bw / 1e9:.1f} GB/s; {args.threads} threads")
    print(f"heads {args.heads} / {args.kv_heads} KV, dim {args.dim}, {args.dtype}, one query, batch 1")
    head = ("cached", "kernel ms", "GB/s", "% bw", "sdpa ms", "kernel vs sdpa", "max |diff|")
    print(f"{head[0]:>7} {head[1]:>10} {head[2]:>7} {head[3]:>6} {head[4]:>8} {head[5]:>15} {head[6]:>11}")
    for length in lengths:
        q = torch.randn(1, args.heads, 1, args.dim, generator=g).to(dtype)
        k, v = (torch.randn(1, args.kv_heads, length, args.dim, generator=g).to(dtype) for _ in range(2))
        scale = 1 / math.sqrt(args.dim)
        with torch.inference_mode():
            ours = best(lambda: kernels.decode_attention(q, k, v, None, scale), args.repeat)  # noqa: B023
            sdpa = best(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True), args.repeat)  # noqa: B023
            diff = (kernels.decode_attention(q, k, v, None, scale).float()
                    - F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale,
                                                     enable_gqa=True)).abs().max()  # fmt: skip
        read = 2 * k.numel() * k.element_size()
        print(
            f"{length:7d} {ours * 1e3:10.3f} {read / ours / 1e9:7.1f} {read / ours / bw:6.0%} {sdpa * 1e3:8.3f}"
            f" {sdpa / ours:14.2f}x {float(diff):11.1e}"
        )


if __name__ == "__main__":
    main()
