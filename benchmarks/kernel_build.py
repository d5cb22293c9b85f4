"""How long the first use of the CPU kernels compiles, with the headers the sources include (torch/library.h and
torch/types.h) against torch/extension.h first (what load_inline adds unless told not to: pybind11 and the whole
C++ API), rounds interleaved, each build in a fresh folder.

    python benchmarks/kernel_build.py --rounds 2 [--isa avx2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from machine import cpu_name
from torch.utils.cpp_extension import load_inline

from ernie45.runtime import kernels


def build(isa: str, whole_api: bool, tag: str) -> float:
    sources, flags = kernels.build_inputs(isa)
    # a namespace of its own per build: the library is loaded once built, and torch refuses a namespace twice
    sources = [s.replace("TORCH_LIBRARY(ernie45,", f"TORCH_LIBRARY(e45b{tag},").replace(
        "TORCH_LIBRARY_IMPL(ernie45,", f"TORCH_LIBRARY_IMPL(e45b{tag},") for s in sources]  # fmt: skip
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        load_inline(f"e45b{tag}", cpp_sources=sources, extra_cflags=flags, extra_ldflags=["-fopenmp"],
                    build_directory=work, is_python_module=False, no_implicit_headers=not whole_api)  # fmt: skip
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--isa", default=None, help="avx512 or avx2 (default: what this CPU runs)")
    args = ap.parse_args()
    isa = args.isa or kernels.isa()
    times: dict[str, list[float]] = {"torch/library.h + torch/types.h": [], "torch/extension.h first": []}
    for r in range(args.rounds):
        for i, name in enumerate(times):
            times[name].append(build(isa, whole_api=i == 1, tag=f"{r}{i}"))
    print(f"{cpu_name()}; kernels for {isa}; {args.rounds} rounds, interleaved")
    print(f"{'headers':34} {'median s':>9} {'runs':>20}")
    for name, ts in times.items():
        print(f"{name:34} {statistics.median(ts):9.1f} {', '.join(f'{t:.1f}' for t in ts):>20}")


if __name__ == "__main__":
    main()
