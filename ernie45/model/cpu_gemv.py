"""Matrix-vector kernels for CPU decode (bf16, int8, int4 weights), built on first use with the local C++
compiler.

One decode step reads every weight once for a row or a few: the time is memory traffic. torch's kernels for
one row read weights well below the machine's bandwidth (bf16 also through oneDNN's packed layout, int8 and
int4 through their packed matmuls), while a plain loop streaming the weights with AVX512 dot products gets
closer to it. With the weights on 2 MB pages (`hugepages`) the bf16 kernel reads 24 GB/s against 14 for torch's
bf16 linear over a model's worth of matrices, and whole 0.3B decode steps run ~19% faster (3 interleaved
runs of `benchmarks/decode.py`'s rows: 23.9 vs 20.0 tok/s), so it is on by default for bf16 weights. The int8
and int4 kernels gained nothing in whole steps on 2 cores (int8 runs on FBGEMM where it can) and are on only
with `ERNIE45_CPU_KERNELS=1`; `ERNIE45_CPU_KERNELS=0` switches all off. They need AVX512-BF16 and a C++
compiler; without either `kernel()` is None and callers keep torch's ops. The build (about a minute, once per
machine) lands in torch's extension cache.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger("ernie45")
NAME = "ernie45_cpu_gemv"
MAX_ROWS = 8  # rows one call takes (decode batches); more rows go to a matmul
K_MULTIPLE = 32  # one AVX512-BF16 dot product consumes 32 input columns

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

// Every weight row is streamed once, start to end, with a software prefetch PF bytes ahead (the hardware
// prefetcher stops at each 4 KB page): on 2 cores 22-26 GB/s, against 16-18 for oneDNN's packed bf16 kernel
// and for four rows read interleaved. Each input row (M <= 8) is dotted with the weight bytes while they sit in
// L1: dot(acc, row, k) adds columns k..k+63 bytes' worth of every input row into acc[m]; y = finish(sum, n).
constexpr int64_t PF = 2048;

template <class Dot, class Finish>
void stream_rows(int64_t M, int64_t N, int64_t row_bytes, const char* base, float* Y, Dot dot, Finish finish) {
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const char* row = base + n * row_bytes;
      __m512 acc[8];
      for (int64_t m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
      for (int64_t b = 0; b < row_bytes; b += 64) {
        _mm_prefetch(row + b + PF, _MM_HINT_T0);
        dot(acc, row + b, b);
      }
      for (int64_t m = 0; m < M; ++m) Y[m * N + n] = finish(_mm512_reduce_add_ps(acc[m]), n);
    }
  });
}

// y[m, n] = sum_k x[m, k] * w[n, k]; x [M, K] bf16, w [N, K] bf16 row-major, K % 32 == 0; y fp32.
torch::Tensor gemv_bf16(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && w.scalar_type() == torch::kBFloat16, "bf16 only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && x.size(1) == w.size(1) && x.size(1) % 32 == 0);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(M <= 8, "at most 8 rows");
  auto y = torch::empty({M, N}, x.options().dtype(torch::kFloat));
  const char* W = reinterpret_cast<const char*>(w.data_ptr<at::BFloat16>());
  const char* X = reinterpret_cast<const char*>(x.data_ptr<at::BFloat16>());
  stream_rows(M, N, K * 2, W, y.data_ptr<float>(), [&](__m512* acc, const char* wp, int64_t b) {
    const __m512bh wv = (__m512bh)_mm512_loadu_si512(wp);
    for (int64_t m = 0; m < M; ++m)
      acc[m] = _mm512_dpbf16_ps(acc[m], wv, (__m512bh)_mm512_loadu_si512(X + m * K * 2 + b));
  }, [](float sum, int64_t) { return sum; });
  return y;
}

// y[m, n] = scale[n] * sum_k x[m, k] * w[n, k]; x [M, K] fp32, w [N, K] int8, K % 64 == 0.
torch::Tensor gemv_int8(torch::Tensor x, torch::Tensor w, torch::Tensor scale) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && w.scalar_type() == torch::kChar);
  TORCH_CHECK(scale.scalar_type() == torch::kFloat);
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && x.size(1) == w.size(1) && x.size(1) % 64 == 0);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(M <= 8, "at most 8 rows");
  auto y = torch::empty({M, N}, x.options());
  const float* X = x.data_ptr<float>();
  const float* S = scale.data_ptr<float>();
  stream_rows(M, N, K, reinterpret_cast<const char*>(w.data_ptr<int8_t>()), y.data_ptr<float>(),
              [&](__m512* acc, const char* wp, int64_t b) {
    __m512 wv[4];
    for (int i = 0; i < 4; ++i)
      wv[i] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wp) + i)));
    for (int64_t m = 0; m < M; ++m)
      for (int i = 0; i < 4; ++i) acc[m] = _mm512_fmadd_ps(wv[i], _mm512_loadu_ps(X + m * K + b + 16 * i), acc[m]);
  }, [&](float sum, int64_t n) { return sum * S[n]; });
  return y;
}

// int4 in torch's CPU tile layout: tiles [N/64, K, 32] bytes, byte j of (tile t, column k) holds the codes of
// rows 64t + j (low nibble) and 64t + j + 32 (high nibble); sz [K/G, N, 2] bf16 = (scale, zero) per group of
// G columns, w = (code - 8) * scale + zero. Vectorised over the 64 rows of a tile: per column one broadcast of
// x and four FMAs; per group the code sums are scaled and sum(x) * (zero - 8 scale) added.
static inline __m512 bf16x16(const uint16_t* p) {  // 16 bf16 -> 16 fp32 (bf16 is fp32's upper half)
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

torch::Tensor gemv_int4(torch::Tensor x, torch::Tensor tiles, torch::Tensor sz, int64_t group) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && sz.scalar_type() == torch::kBFloat16);
  TORCH_CHECK(x.is_contiguous() && sz.is_contiguous());
  const int64_t M = x.size(0), K = x.size(1), N = sz.size(1);
  TORCH_CHECK(N % 64 == 0 && K % group == 0 && tiles.numel() == N * K / 2 && sz.size(0) == K / group);
  auto y = torch::empty({M, N}, x.options());
  const uint8_t* T = tiles.data_ptr<uint8_t>();
  const float* X = x.data_ptr<float>();
  const uint16_t* SZ = reinterpret_cast<const uint16_t*>(sz.data_ptr<at::BFloat16>());
  float* Y = y.data_ptr<float>();
  const __m256i low = _mm256_set1_epi8(0x0F);
  at::parallel_for(0, N / 64, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = X + m * K;
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t g = 0; g < K / group; ++g) {
          __m512 part[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
          float xsum = 0.f;
          for (int64_t k = g * group; k < (g + 1) * group; ++k) {
            const __m512 xb = _mm512_set1_ps(xm[k]);
            xsum += xm[k];
            const uint8_t* col = T + (t * K + k) * 32;
            if (!(k & 1)) _mm_prefetch(reinterpret_cast<const char*>(col) + PF, _MM_HINT_T0);
            const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col));
            const __m256i lo = _mm256_and_si256(b, low), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
            const __m128i q[4] = {_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1),
                                  _mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1)};
            for (int i = 0; i < 4; ++i)
              part[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q[i])), xb, part[i]);
          }
          const uint16_t* row = SZ + (g * N + t * 64) * 2;  // (scale, zero) pairs of this tile's 64 rows
          const __m512i evens = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
          const __m512i odds = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
          const __m512 xs = _mm512_set1_ps(xsum), eight = _mm512_set1_ps(8.f);
          for (int i = 0; i < 4; ++i) {
            const __m512 a = bf16x16(row + 32 * i), c = bf16x16(row + 32 * i + 16);
            const __m512 s = _mm512_permutex2var_ps(a, evens, c), z = _mm512_permutex2var_ps(a, odds, c);
            acc[i] = _mm512_fmadd_ps(part[i], s, acc[i]);
            acc[i] = _mm512_fmadd_ps(xs, _mm512_fnmadd_ps(eight, s, z), acc[i]);
          }
        }
        for (int i = 0; i < 4; ++i) _mm512_storeu_ps(Y + m * N + t * 64 + 16 * i, acc[i]);
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
    """The compiled module (`gemv_bf16`, `gemv_int8`, `gemv_int4`), or None where it cannot run here (the reason
    is logged once)."""
    if _mode() == "0":
        return None
    if "avx512_bf16" not in _cpu_flags():
        log.info("bf16 decode kernel: this CPU has no AVX512-BF16; using torch's linear")
        return None
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        log.info("bf16 decode kernel: no C++ compiler found; using torch's linear")
        return None
    try:
        from torch.utils.cpp_extension import _get_build_directory, load_inline

        if not any(Path(_get_build_directory(NAME, False)).glob("*.so")):
            log.warning("compiling ernie45's CPU decode kernels (once per machine, about a minute)")
        # -fopenmp: at::parallel_for is inline in ATen's headers, and without it runs on one thread
        flags = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"]
        functions = ["gemv_bf16", "gemv_int8", "gemv_int4"]
        return load_inline(
            NAME, cpp_sources=_SOURCE, functions=functions, extra_cflags=flags, extra_ldflags=["-fopenmp"]
        )
    except Exception as e:  # a broken toolchain must not stop inference: torch's ops still work
        log.warning("bf16 decode kernel did not build (%s); using torch's linear", str(e).splitlines()[0][:200])
        return None


def _mode() -> str:
    """`ERNIE45_CPU_KERNELS`: "bf16" (default) the bf16 kernel only, "1" all three, "0" none."""
    return os.environ.get("ERNIE45_CPU_KERNELS", "bf16")


@contextlib.contextmanager
def switched(on: bool) -> Iterator[None]:
    """All the kernels on, or all off, inside the block; as they were after it."""
    before = os.environ.get("ERNIE45_CPU_KERNELS")
    os.environ["ERNIE45_CPU_KERNELS"] = "1" if on else "0"
    kernel.cache_clear()
    try:
        yield
    finally:
        if before is None:
            del os.environ["ERNIE45_CPU_KERNELS"]
        else:
            os.environ["ERNIE45_CPU_KERNELS"] = before
        kernel.cache_clear()


def ready(quantized: bool = False) -> bool:
    """Whether the bf16 (or the int8 / int4) kernels run here and now (not while torch.compile traces: it keeps
    torch's own ops)."""
    on = _mode() == "1" or not quantized
    return on and not torch.compiler.is_compiling() and kernel() is not None


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


def gemv_int8(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x2 [M, K] @ (qweight int8 [N, K] * scales [N])^T in fp32."""
    return kernel().gemv_int8(x2.float().contiguous(), qweight, scales.float())


def gemv_int4(x2: torch.Tensor, tiles: torch.Tensor, scales_zeros: torch.Tensor, group: int) -> torch.Tensor:
    """x2 [M, K] @ W^T in fp32, W in torch's CPU int4 tiles with bf16 (scale, zero) [K/group, N, 2] per group."""
    return kernel().gemv_int4(x2.float().contiguous(), tiles, scales_zeros.to(torch.bfloat16).contiguous(), group)
