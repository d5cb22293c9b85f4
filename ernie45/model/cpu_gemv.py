"""A bf16 matrix-vector kernel for CPU decode, built on first use with the local C++ compiler.

One decode step reads every weight once for a row or a few: the time is memory traffic. torch's bf16 linear
for one row reads weights at well below the machine's bandwidth (also through oneDNN's packed layout), while
a plain loop over the weight rows with AVX512-BF16 dot products streams them at close to it. The kernel
needs AVX512-BF16 and a C++ compiler; without either (or with `ERNIE45_CPU_KERNELS=0`) `kernel()` is None and
callers keep torch's ops. The build (about a minute, once per machine) lands in torch's extension cache.
"""

from __future__ import annotations

import logging
import os
import shutil
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger("ernie45")
MAX_ROWS = 8  # rows one call takes (decode batches); more rows go to a matmul
K_MULTIPLE = 32  # one AVX512-BF16 dot product consumes 32 input columns

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

// y[m, n] = sum_k x[m, k] * w[n, k]; x [M, K] bf16, w [N, K] bf16 row-major, K % 32 == 0; y fp32.
// Four weight rows at a time (four streams the prefetcher follows), every input row against them while
// they sit in L1.
torch::Tensor gemv_bf16(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && w.scalar_type() == torch::kBFloat16, "bf16 only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && x.size(1) == w.size(1) && x.size(1) % 32 == 0);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options().dtype(torch::kFloat));
  const uint16_t* W = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  const uint16_t* X = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  float* Y = y.data_ptr<float>();
  constexpr int64_t R = 4;
  at::parallel_for(0, (N + R - 1) / R, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * R, rows = std::min(R, N - n0);
      for (int64_t m = 0; m < M; ++m) {
        __m512 acc[R] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        const uint16_t* xm = X + m * K;
        for (int64_t k = 0; k < K; k += 32) {
          const __m512bh xv = (__m512bh)_mm512_loadu_si512(xm + k);
          for (int64_t r = 0; r < rows; ++r)
            acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512(W + (n0 + r) * K + k), xv);
        }
        for (int64_t r = 0; r < rows; ++r) Y[m * N + n0 + r] = _mm512_reduce_add_ps(acc[r]);
      }
    }
  });
  return y;
}
"""


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


@lru_cache(maxsize=1)
def kernel():
    """The compiled module (with `gemv_bf16`), or None where it cannot run here (the reason is logged once)."""
    if os.environ.get("ERNIE45_CPU_KERNELS", "1") == "0":
        return None
    if "avx512_bf16" not in _cpu_flags():
        log.info("bf16 decode kernel: this CPU has no AVX512-BF16; using torch's linear")
        return None
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        log.info("bf16 decode kernel: no C++ compiler found; using torch's linear")
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        flags = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"]
        return load_inline("ernie45_cpu_gemv", cpp_sources=_SOURCE, functions=["gemv_bf16"], extra_cflags=flags)
    except Exception as e:  # a broken toolchain must not stop inference: torch's ops still work
        log.warning("bf16 decode kernel did not build (%s); using torch's linear", str(e).splitlines()[0][:200])
        return None


def usable(weight: torch.Tensor) -> bool:
    """Whether `weight` [N, K] fits the kernel (CPU, bf16, contiguous, K a multiple of 32)."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and weight.is_contiguous()
        and weight.shape[1] % K_MULTIPLE == 0
    )


def gemv(x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x2 [M <= MAX_ROWS, K] @ weight[N, K]^T in fp32 (x2 is cast to bf16)."""
    return kernel().gemv_bf16(x2.to(torch.bfloat16).contiguous(), weight)
