// Kernels for CPU decode, built on first use by runtime/build.py; why they exist: runtime/kernels.py.
#include <torch/library.h>  // TORCH_LIBRARY: the ops are registered, not a Python module
#include <torch/types.h>    // at::Tensor, torch::empty: no pybind11, half the compile of torch/extension.h
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

// Every weight row is streamed once, start to end. On the Intel part a software prefetch 2 KB ahead (its
// hardware prefetcher stops at each 4 KB page) gave 22-26 GB/s on 2 cores, against 16-18 for oneDNN's packed bf16
// kernel and for four rows read interleaved; on an AMD EPYC the same prefetch cost 9% of a decode step's matvecs
// against none. So the distance is the process's (`set_prefetch`: bytes ahead, 0 none), which `kernels.py` picks
// by timing the candidates on this CPU. Each input row (M <= 8) is dotted with the weight bytes while they sit in
// L1, with M a template constant (`with_rows`) so that the running sums stay in registers.
static int64_t prefetch_ahead = 2048;  // (the int4 tiles' stream takes the same distance)

int64_t set_prefetch(int64_t bytes) {
  TORCH_CHECK(bytes >= 0 && bytes <= (1 << 16) && bytes % 64 == 0, "prefetch distance: 0..65536, a multiple of 64");
  const int64_t before = prefetch_ahead;
  prefetch_ahead = bytes;
  return before;
}

// f(std::integral_constant<int, M>{}) for the row count M (1..8) at hand.
template <class F>
static void with_rows(int64_t M, F f) {
  switch (M) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

// y[m, n] = sum_k x[m, k] * w[n, k] on raw pointers (no tensor made or checked: the dense stack's inner loop);
// x [M, K] and w [N, K] bf16 row-major, K % 32 == 0, M <= 8; y [M, N] in Out.
template <int M, class Out>
static void bf16_stream(const char* X, int64_t K, const char* W, int64_t N, Out* y) {
  const int64_t pf = prefetch_ahead, row_bytes = K * 2;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const char* row = W + n * row_bytes;
      __m512 acc[M][2];
      for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
      int64_t b = 0;
      for (; b + 128 <= row_bytes; b += 128) {
        if (pf) {
          _mm_prefetch(row + b + pf, _MM_HINT_T0);
          _mm_prefetch(row + b + pf + 64, _MM_HINT_T0);
        }
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(row + b), w1 = (__m512bh)_mm512_loadu_si512(row + b + 64);
        for (int m = 0; m < M; ++m) {
          acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, (__m512bh)_mm512_loadu_si512(X + m * row_bytes + b));
          acc[m][1] = _mm512_dpbf16_ps(acc[m][1], w1, (__m512bh)_mm512_loadu_si512(X + m * row_bytes + b + 64));
        }
      }
      if (b < row_bytes) {
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(row + b);
        for (int m = 0; m < M; ++m)
          acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, (__m512bh)_mm512_loadu_si512(X + m * row_bytes + b));
      }
      for (int m = 0; m < M; ++m) y[m * N + n] = Out(_mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1])));
    }
  });
}

template <class Out>
void gemv_bf16_raw(const at::BFloat16* x, int64_t M, int64_t K, const at::BFloat16* w, int64_t N, Out* y) {
  const char *X = reinterpret_cast<const char*>(x), *W = reinterpret_cast<const char*>(w);
  with_rows(M, [&](auto rows) { bf16_stream<decltype(rows)::value>(X, K, W, N, y); });
}

// The same on tensors: y fp32, or bf16 (rounded once, as torch's bf16 linear returns it) with bf16_out.
template <class Out>
torch::Tensor gemv_bf16_to(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && w.scalar_type() == torch::kBFloat16, "bf16 only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && x.size(1) == w.size(1) && x.size(1) % 32 == 0);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(M <= 8, "at most 8 rows");
  auto y = torch::empty({M, N}, x.options().dtype(c10::CppTypeToScalarType<Out>::value));
  gemv_bf16_raw(x.data_ptr<at::BFloat16>(), M, K, w.data_ptr<at::BFloat16>(), N, y.template data_ptr<Out>());
  return y;
}

torch::Tensor gemv_bf16(torch::Tensor x, torch::Tensor w, bool bf16_out) {
  return bf16_out ? gemv_bf16_to<at::BFloat16>(x, w) : gemv_bf16_to<float>(x, w);
}

// x rounded to int8 per 32 columns, as llama.cpp's Q8_0 rounds it: q = round(x * 127 / max|x|), scale xs =
// max|x| / 127 per block; QSUM (where given) the block's sum of q. Both quantized kernels multiply codes by q with
// VNNI.
static void round_rows(const float* X, int64_t M, int64_t K, int8_t* Q, float* XS, int32_t* QSUM) {
  const int64_t B = K / 32;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < B; ++b) {
      const float* xb = X + m * K + b * 32;
      float amax = 0.f;
      for (int i = 0; i < 32; ++i) amax = std::max(amax, std::abs(xb[i]));
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      int qsum = 0;
      for (int i = 0; i < 32; ++i) {
        const int v = static_cast<int>(std::nearbyint(xb[i] * inv));
        Q[m * K + b * 32 + i] = static_cast<int8_t>(v);
        qsum += v;
      }
      XS[m * B + b] = amax / 127.f;
      if (QSUM) QSUM[m * B + b] = qsum;
    }
}

struct Int8Rows {  // one gemv_int8 call's operands (see below)
  const int8_t* W;      // codes [N, K]
  const int8_t* Q;      // |q| [M, K] (read as unsigned bytes)
  const __mmask64* SG;  // q < 0 [M, K / 64]
  const float* XS16;    // [M, K / 64, 16]: lanes 0-7 the first 32 columns' x scale, lanes 8-15 the next's
  const float* S;       // [N] the rows' scales in fp32, or
  const uint16_t* S16;  // in bf16
  float* Y;
  int64_t K, N, C, pf;
};

// Row n of w against the M rows of x, streamed start to end (rows read side by side were slower on both CPUs, as
// for the bf16 matvec); two sums per row of x, for even and odd 64 columns, so that no FMA waits on the last.
template <int M>
static inline void int8_row(const Int8Rows& a, int64_t n) {
  const __m512i zero = _mm512_setzero_si512();
  __m512 acc[M][2];
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  const int8_t* row = a.W + n * a.K;
  for (int64_t c = 0; c < a.C; ++c) {
    if (a.pf) _mm_prefetch(reinterpret_cast<const char*>(row + c * 64) + a.pf, _MM_HINT_T0);
    const __m512i wv = _mm512_loadu_si512(row + c * 64);
    for (int m = 0; m < M; ++m) {
      const __m512i d = _mm512_dpbusd_epi32(zero, _mm512_loadu_si512(a.Q + m * a.K + c * 64),
                                            _mm512_mask_sub_epi8(wv, a.SG[m * a.C + c], zero, wv));
      acc[m][c & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_loadu_ps(a.XS16 + (m * a.C + c) * 16),
                                      acc[m][c & 1]);
    }
  }
  float scale;
  if (a.S) {
    scale = a.S[n];
  } else {
    const uint32_t bits = static_cast<uint32_t>(a.S16[n]) << 16;  // bf16 is fp32's upper half
    std::memcpy(&scale, &bits, 4);
  }
  for (int m = 0; m < M; ++m) a.Y[m * a.N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1])) * scale;
}

template <int M>
static void int8_stream(const Int8Rows& a) {
  at::parallel_for(0, a.N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) int8_row<M>(a, n);
  });
}

// y[m, n] = scale[n] * sum_k x[m, k] * w[n, k]; x [M, K] fp32, w [N, K] int8 codes in -127..127 (one scale per
// output row, fp32 or bf16), K % 64 == 0. x is rounded to int8 per 32 columns (`round_rows`) and VNNI multiplies
// codes by it: vpdpbusd wants one unsigned operand, so |q| is the unsigned one and each code takes q's sign
// (one masked subtract), as llama.cpp's Q8_0 dot does; 64 columns are one load, one dpbusd, one convert and
// one FMA by the two blocks' scales per row, against 64 widenings and FMAs in fp32.
// The rounded x of one quantized matvec, reused from call to call (the decode calls come from one thread, one
// at a time): no allocation in the step's inner loop.
struct Rounded {
  std::vector<int8_t> q;
  std::vector<float> xs, x2;
  std::vector<int32_t> qsum;
  std::vector<__mmask64> signs;
};
static Rounded& rounded(int64_t M, int64_t K) {
  static thread_local Rounded r;
  r.q.resize(M * K);
  r.xs.resize(M * K / 32);
  r.x2.resize(M * K / 2);  // int8: XS16 [M, K/64, 16]; int4: XC [M, K/group, 2] (no larger)
  r.qsum.resize(M * K / 32);
  r.signs.resize(M * K / 64);
  return r;
}

// The kernel on raw pointers: x [M, K] fp32 (M <= 8, K % 64 == 0), codes w [N, K], scales s (fp32) or s16 (bf16,
// the other null); y [M, N] fp32.
void gemv_int8_raw(const float* X, int64_t M, int64_t K, const int8_t* W, const float* S, const uint16_t* S16,
                   int64_t N, float* Y) {
  const int64_t B = K / 32, C = K / 64;
  Rounded& r = rounded(M, K);
  int8_t* Q = r.q.data();
  float *XS = r.xs.data(), *XS16 = r.x2.data();
  round_rows(X, M, K, Q, XS, nullptr);
  __mmask64* SG = r.signs.data();  // q < 0 per column, 64 columns a mask
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < C; ++c) {
      int8_t* at = Q + m * K + c * 64;
      const __m512i qv = _mm512_loadu_si512(at);
      SG[m * C + c] = _mm512_movepi8_mask(qv);
      _mm512_storeu_si512(at, _mm512_abs_epi8(qv));  // q's magnitude, in place (read as unsigned bytes)
      const __m512 lo = _mm512_set1_ps(XS[m * B + 2 * c]), hi = _mm512_set1_ps(XS[m * B + 2 * c + 1]);
      _mm512_storeu_ps(XS16 + (m * C + c) * 16, _mm512_mask_blend_ps(0xFF00, lo, hi));  // lanes 8-15: block 2
    }
  const Int8Rows a{W, Q, SG, XS16, S, S16, Y, K, N, C, prefetch_ahead};
  with_rows(M, [&](auto rows) { int8_stream<decltype(rows)::value>(a); });
}

torch::Tensor gemv_int8(torch::Tensor x, torch::Tensor w, torch::Tensor scale) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && w.scalar_type() == torch::kChar);
  TORCH_CHECK(scale.scalar_type() == torch::kFloat || scale.scalar_type() == torch::kBFloat16);
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && scale.is_contiguous());
  TORCH_CHECK(x.size(1) == w.size(1) && x.size(1) % 64 == 0 && scale.numel() == w.size(0));
  TORCH_CHECK(x.size(0) <= 8, "at most 8 rows");
  auto y = torch::empty({x.size(0), w.size(0)}, x.options());
  const bool bf16 = scale.scalar_type() == torch::kBFloat16;
  gemv_int8_raw(x.data_ptr<float>(), x.size(0), x.size(1), w.data_ptr<int8_t>(),
                bf16 ? nullptr : scale.data_ptr<float>(),
                bf16 ? reinterpret_cast<const uint16_t*>(scale.data_ptr<at::BFloat16>()) : nullptr, w.size(0),
                y.data_ptr<float>());
  return y;
}

// int4 in torch's CPU tile layout: tiles [N/64, K, 32] bytes, byte j of (tile t, column k) holds the codes of
// rows 64t + j (low nibble) and 64t + j + 32 (high nibble); sz [K/G, N, 2] bf16 = (scale, zero) per group of
// G columns, w = (code - 8) * scale + zero. As llama.cpp does for Q4_0, x is rounded to int8 per 32 columns
// (scale max|x| / 127) so that VNNI multiplies codes by x: one vpdpbusd is 64 multiply-adds (16 rows x 4
// columns) where an fp32 FMA is 16, and no code is converted to float. AVX512-VBMI's two-table byte permute
// turns four columns of the tile (rows across bytes) into 16 rows x 4 columns per register (one row per lane).
// Per row and group: y += scale * (sum_b xs_b * (codes . q)_b - 8 * sum_b xs_b sum(q_b)) + zero * sum(x).
static inline __m512 bf16x16(const uint16_t* p) {  // 16 bf16 -> 16 fp32 (bf16 is fp32's upper half)
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

struct Int4Rows {  // one gemv_int4 call's operands (see below)
  const uint8_t* T;
  const uint16_t* SZ;
  const int8_t* Q;
  const float *XS, *XC;
  float* Y;
  int64_t K, N, B, G, group;
};

#ifdef ERNIE45_AVX2
// The permute below without AVX512-VBMI: four tile columns a, b, c, d (32 rows' codes each) into 16 rows x 4
// columns per 512-bit value (out[0]: rows 0-15, out[1]: rows 16-31) from byte and word unpacks, which work within
// 128-bit lanes, and two lane swaps per output.
static inline void rows_by_four(__m256i a, __m256i b, __m256i c, __m256i d, __m512i* out) {
  const __m256i ab_lo = _mm256_unpacklo_epi8(a, b), ab_hi = _mm256_unpackhi_epi8(a, b);  // rows 0-7 | 16-23, ...
  const __m256i cd_lo = _mm256_unpacklo_epi8(c, d), cd_hi = _mm256_unpackhi_epi8(c, d);
  const __m256i q0 = _mm256_unpacklo_epi16(ab_lo, cd_lo), q1 = _mm256_unpackhi_epi16(ab_lo, cd_lo);  // 0-3 | 16-19
  const __m256i q2 = _mm256_unpacklo_epi16(ab_hi, cd_hi), q3 = _mm256_unpackhi_epi16(ab_hi, cd_hi);  // 8-11 | 24-27
  out[0].lo = _mm256_permute2x128_si256(q0, q1, 0x20);
  out[0].hi = _mm256_permute2x128_si256(q2, q3, 0x20);
  out[1].lo = _mm256_permute2x128_si256(q0, q1, 0x31);
  out[1].hi = _mm256_permute2x128_si256(q2, q3, 0x31);
}
#endif

// Rows m0 .. m0 + R - 1 of y for tile t (its 64 output rows): every four tile columns are loaded and permuted
// into 16 rows x 4 columns once and multiplied by each of the R rows of x, so a batch decodes the codes once per
// R rows instead of once per row. Each row's sums are formed in the same order for any R (the same numbers).
template <int R>
static void int4_tile_rows(const Int4Rows& a, int64_t t, int64_t m0) {
  const __m512i low = _mm512_set1_epi8(0x0F);
#ifndef ERNIE45_AVX2
  __m512i idx[2];  // lane i <- bytes i, 32 + i of the first table and i, 32 + i of the second (rows i, 16 + i)
  for (int h = 0; h < 2; ++h) {
    alignas(64) uint8_t b[64];
    for (int i = 0; i < 16; ++i)
      for (int c = 0; c < 4; ++c) b[4 * i + c] = static_cast<uint8_t>(16 * h + i + 32 * c);
    idx[h] = _mm512_load_si512(b);
  }
#endif
  const __m512i evens = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odds = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  const int64_t K = a.K, N = a.N, B = a.B, G = a.G, per = a.group / 32, pf = prefetch_ahead;
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    if (g + 2 < G) {  // this tile's (scale, zero) pairs two groups on: 256 bytes N * 4 bytes apart, which no
      const char* next = reinterpret_cast<const char*>(a.SZ + ((g + 2) * N + t * 64) * 2);  // hardware prefetcher
      for (int line = 0; line < 4; ++line) _mm_prefetch(next + 64 * line, _MM_HINT_T0);  // follows
    }
    __m512 part[R][4];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < 4; ++i) part[r][i] = _mm512_setzero_ps();
    for (int64_t b = g * per; b < (g + 1) * per; ++b) {
      __m512i dot[R][4];
      for (int r = 0; r < R; ++r)
        for (int i = 0; i < 4; ++i) dot[r][i] = _mm512_setzero_si512();
      for (int64_t k = b * 32; k < b * 32 + 32; k += 4) {
        const char* col = reinterpret_cast<const char*>(a.T + (t * K + k) * 32);
        if (pf) {
          _mm_prefetch(col + pf, _MM_HINT_T0);
          _mm_prefetch(col + pf + 64, _MM_HINT_T0);
        }
        const __m512i v = _mm512_loadu_si512(col), c = _mm512_loadu_si512(col + 64);
        const __m512i vlo = _mm512_and_si512(v, low), clo = _mm512_and_si512(c, low);
        const __m512i vhi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        const __m512i chi = _mm512_and_si512(_mm512_srli_epi16(c, 4), low);
#ifdef ERNIE45_AVX2
        __m512i codes[4];
        rows_by_four(vlo.lo, vlo.hi, clo.lo, clo.hi, codes);
        rows_by_four(vhi.lo, vhi.hi, chi.lo, chi.hi, codes + 2);
#else
        const __m512i codes[4] = {_mm512_permutex2var_epi8(vlo, idx[0], clo),
                                  _mm512_permutex2var_epi8(vlo, idx[1], clo),
                                  _mm512_permutex2var_epi8(vhi, idx[0], chi),
                                  _mm512_permutex2var_epi8(vhi, idx[1], chi)};
#endif
        for (int r = 0; r < R; ++r) {
          int32_t four;
          std::memcpy(&four, a.Q + (m0 + r) * K + k, 4);
          const __m512i xv = _mm512_set1_epi32(four);
          for (int i = 0; i < 4; ++i) dot[r][i] = _mm512_dpbusd_epi32(dot[r][i], codes[i], xv);
        }
      }
      for (int r = 0; r < R; ++r) {
        const __m512 f = _mm512_set1_ps(a.XS[(m0 + r) * B + b]);
        for (int i = 0; i < 4; ++i) part[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r][i]), f, part[r][i]);
      }
    }
    const uint16_t* row = a.SZ + (g * N + t * 64) * 2;  // (scale, zero) pairs of this tile's 64 rows
    for (int i = 0; i < 4; ++i) {
      const __m512 lo = bf16x16(row + 32 * i), hi = bf16x16(row + 32 * i + 16);
      const __m512 s = _mm512_permutex2var_ps(lo, evens, hi), z = _mm512_permutex2var_ps(lo, odds, hi);
      for (int r = 0; r < R; ++r) {
        const float* xc = a.XC + ((m0 + r) * G + g) * 2;
        acc[r][i] = _mm512_fmadd_ps(_mm512_sub_ps(part[r][i], _mm512_set1_ps(8.f * xc[0])), s, acc[r][i]);
        acc[r][i] = _mm512_fmadd_ps(_mm512_set1_ps(xc[1]), z, acc[r][i]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i) _mm512_storeu_ps(a.Y + (m0 + r) * N + t * 64 + 16 * i, acc[r][i]);
}

// The kernel on raw pointers: x [M, K] fp32, tiles and (scale, zero) pairs as above, y [M, N] fp32.
void gemv_int4_raw(const float* X, int64_t M, int64_t K, const uint8_t* T, const uint16_t* SZ, int64_t N,
                   int64_t group, float* Y) {
  const int64_t B = K / 32, G = K / group;
  // x per 32 columns: int8 values q, their scale xs (`round_rows`); per group: c = sum_b xs_b * sum(q_b), sum(x)
  Rounded& r = rounded(M, K);
  int8_t* Q = r.q.data();
  float *XS = r.xs.data(), *XC = r.x2.data();
  const int32_t* QS = r.qsum.data();
  round_rows(X, M, K, Q, XS, r.qsum.data());
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      float c = 0.f, total = 0.f;
      for (int64_t b = g * group / 32; b < (g + 1) * group / 32; ++b) {
        for (int i = 0; i < 32; ++i) total += X[m * K + b * 32 + i];
        c += XS[m * B + b] * QS[m * B + b];
      }
      XC[(m * G + g) * 2] = c;
      XC[(m * G + g) * 2 + 1] = total;
    }
  const Int4Rows a{T, SZ, Q, XS, XC, Y, K, N, B, G, group};
  at::parallel_for(0, N / 64, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {  // rows four at a time: each tile column's codes decoded once for them
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) int4_tile_rows<4>(a, t, m);
      for (; m + 2 <= M; m += 2) int4_tile_rows<2>(a, t, m);
      if (m < M) int4_tile_rows<1>(a, t, m);
    }
  });
}

torch::Tensor gemv_int4(torch::Tensor x, torch::Tensor tiles, torch::Tensor sz, int64_t group) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && sz.scalar_type() == torch::kBFloat16);
  TORCH_CHECK(x.is_contiguous() && sz.is_contiguous());
  const int64_t M = x.size(0), K = x.size(1), N = sz.size(1), G = K / group;
  TORCH_CHECK(N % 64 == 0 && group % 32 == 0 && K % group == 0 && tiles.numel() == N * K / 2 && sz.size(0) == G);
  auto y = torch::empty({M, N}, x.options());
  gemv_int4_raw(x.data_ptr<float>(), M, K, tiles.data_ptr<uint8_t>(),
                reinterpret_cast<const uint16_t*>(sz.data_ptr<at::BFloat16>()), N, group, y.data_ptr<float>());
  return y;
}
