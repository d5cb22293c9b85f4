// Kernels for CPU decode, built by cpu_gemv.py (torch's cpp_extension) on first use; see its docstring.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>

// Every weight row is streamed once, start to end, with a software prefetch PF bytes ahead (the hardware
// prefetcher stops at each 4 KB page): on 2 cores 22-26 GB/s, against 16-18 for oneDNN's packed bf16 kernel
// and for four rows read interleaved. Each input row (M <= 8) is dotted with the weight bytes while they sit in
// L1: dot(acc, row, k) adds columns k..k+63 bytes' worth of every input row into acc[m]; y = finish(sum, n).
constexpr int64_t PF = 2048;

template <class Out, class Dot, class Finish>
void stream_rows(int64_t M, int64_t N, int64_t row_bytes, const char* base, Out* Y, Dot dot, Finish finish) {
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const char* row = base + n * row_bytes;
      __m512 acc[8];
      for (int64_t m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
      for (int64_t b = 0; b < row_bytes; b += 64) {
        _mm_prefetch(row + b + PF, _MM_HINT_T0);
        dot(acc, row + b, b);
      }
      for (int64_t m = 0; m < M; ++m) Y[m * N + n] = Out(finish(_mm512_reduce_add_ps(acc[m]), n));
    }
  });
}

// y[m, n] = sum_k x[m, k] * w[n, k]; x [M, K] bf16, w [N, K] bf16 row-major, K % 32 == 0; y fp32, or bf16
// (rounded once, as torch's bf16 linear returns it) with bf16_out.
template <class Out>
torch::Tensor gemv_bf16_to(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && w.scalar_type() == torch::kBFloat16, "bf16 only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && x.size(1) == w.size(1) && x.size(1) % 32 == 0);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(M <= 8, "at most 8 rows");
  auto y = torch::empty({M, N}, x.options().dtype(c10::CppTypeToScalarType<Out>::value));
  const char* W = reinterpret_cast<const char*>(w.data_ptr<at::BFloat16>());
  const char* X = reinterpret_cast<const char*>(x.data_ptr<at::BFloat16>());
  stream_rows(M, N, K * 2, W, y.template data_ptr<Out>(), [&](__m512* acc, const char* wp, int64_t b) {
    const __m512bh wv = (__m512bh)_mm512_loadu_si512(wp);
    for (int64_t m = 0; m < M; ++m)
      acc[m] = _mm512_dpbf16_ps(acc[m], wv, (__m512bh)_mm512_loadu_si512(X + m * K * 2 + b));
  }, [](float sum, int64_t) { return sum; });
  return y;
}

torch::Tensor gemv_bf16(torch::Tensor x, torch::Tensor w, bool bf16_out) {
  return bf16_out ? gemv_bf16_to<at::BFloat16>(x, w) : gemv_bf16_to<float>(x, w);
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

// Rows m0 .. m0 + R - 1 of y for tile t (its 64 output rows): every four tile columns are loaded and permuted
// into 16 rows x 4 columns once and multiplied by each of the R rows of x, so a batch decodes the codes once per
// R rows instead of once per row. Each row's sums are formed in the same order for any R (the same numbers).
template <int R>
static void int4_tile_rows(const Int4Rows& a, int64_t t, int64_t m0) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512i idx[2];  // lane i <- bytes i, 32 + i of the first table and i, 32 + i of the second (rows i, 16 + i)
  for (int h = 0; h < 2; ++h) {
    alignas(64) uint8_t b[64];
    for (int i = 0; i < 16; ++i)
      for (int c = 0; c < 4; ++c) b[4 * i + c] = static_cast<uint8_t>(16 * h + i + 32 * c);
    idx[h] = _mm512_load_si512(b);
  }
  const __m512i evens = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odds = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  const int64_t K = a.K, N = a.N, B = a.B, G = a.G, per = a.group / 32;
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 part[R][4];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < 4; ++i) part[r][i] = _mm512_setzero_ps();
    for (int64_t b = g * per; b < (g + 1) * per; ++b) {
      __m512i dot[R][4];
      for (int r = 0; r < R; ++r)
        for (int i = 0; i < 4; ++i) dot[r][i] = _mm512_setzero_si512();
      for (int64_t k = b * 32; k < b * 32 + 32; k += 4) {
        const char* col = reinterpret_cast<const char*>(a.T + (t * K + k) * 32);
        _mm_prefetch(col + PF, _MM_HINT_T0);
        _mm_prefetch(col + PF + 64, _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(col), c = _mm512_loadu_si512(col + 64);
        const __m512i vlo = _mm512_and_si512(v, low), clo = _mm512_and_si512(c, low);
        const __m512i vhi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        const __m512i chi = _mm512_and_si512(_mm512_srli_epi16(c, 4), low);
        const __m512i codes[4] = {_mm512_permutex2var_epi8(vlo, idx[0], clo),
                                  _mm512_permutex2var_epi8(vlo, idx[1], clo),
                                  _mm512_permutex2var_epi8(vhi, idx[0], chi),
                                  _mm512_permutex2var_epi8(vhi, idx[1], chi)};
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

torch::Tensor gemv_int4(torch::Tensor x, torch::Tensor tiles, torch::Tensor sz, int64_t group) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && sz.scalar_type() == torch::kBFloat16);
  TORCH_CHECK(x.is_contiguous() && sz.is_contiguous());
  const int64_t M = x.size(0), K = x.size(1), N = sz.size(1), B = K / 32, G = K / group;
  TORCH_CHECK(N % 64 == 0 && group % 32 == 0 && K % group == 0 && tiles.numel() == N * K / 2 && sz.size(0) == G);
  // x per 32 columns: int8 values q, their scale xs; per group: c = sum_b xs_b * sum(q_b) and sum(x)
  auto q = torch::empty({M, K}, x.options().dtype(torch::kChar));
  auto xs = torch::empty({M, B}, x.options()), xc = torch::empty({M, G, 2}, x.options());
  const float* X = x.data_ptr<float>();
  int8_t* Q = q.data_ptr<int8_t>();
  float *XS = xs.data_ptr<float>(), *XC = xc.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      float c = 0.f, total = 0.f;
      for (int64_t b = g * group / 32; b < (g + 1) * group / 32; ++b) {
        const float* xb = X + m * K + b * 32;
        float amax = 0.f;
        for (int i = 0; i < 32; ++i) amax = std::max(amax, std::abs(xb[i]));
        const float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
        int qsum = 0;
        for (int i = 0; i < 32; ++i) {
          const int v = static_cast<int>(std::nearbyint(xb[i] * inv));
          Q[m * K + b * 32 + i] = static_cast<int8_t>(v);
          qsum += v;
          total += xb[i];
        }
        XS[m * B + b] = scale;
        c += scale * qsum;
      }
      XC[(m * G + g) * 2] = c;
      XC[(m * G + g) * 2 + 1] = total;
    }
  auto y = torch::empty({M, N}, x.options());
  const Int4Rows a{tiles.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(sz.data_ptr<at::BFloat16>()), Q,
                   XS, XC, y.data_ptr<float>(), K, N, B, G, group};
  at::parallel_for(0, N / 64, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {  // rows four at a time: each tile column's codes decoded once for them
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) int4_tile_rows<4>(a, t, m);
      for (; m + 2 <= M; m += 2) int4_tile_rows<2>(a, t, m);
      if (m < M) int4_tile_rows<1>(a, t, m);
    }
  });
  return y;
}

// ---- Fused decode ops: each replaces several tiny torch ops, whose fixed costs (dispatch, allocation, cold
// caches after the weights streamed past) add up to a fifth of a 0.3B decode step. T is float or bf16; every
// rounding to T happens where the eager torch code rounds, so results match it to fp32 summation order.

template <class T> static inline float f32(T v) { return static_cast<float>(v); }

// 16 consecutive T as fp32.
static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16(const at::BFloat16* p) { return bf16x16(reinterpret_cast<const uint16_t*>(p)); }

// e^x for x <= 0 (softmax after subtracting the max, SiLU's e^-|x|): 2^n * 2^f, 2^f by its Taylor series to
// degree 6 on |f| <= 1/2 (relative error ~1e-7, fp32's own); below -104 the result flushes to 0 as expf does.
static inline __m512 exp_nonpos(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.540353e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.333356e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550411e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402265e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// RMSNorm as layers.RMSNorm computes it: w * T(x * rsqrt(mean(x^2) + eps)), the mean in fp32.
template <class T>
void rmsnorm_rows(const T* X, const T* W, T* Y, int64_t M, int64_t D, float eps) {
  for (int64_t m = 0; m < M; ++m) {
    const T* x = X + m * D;
    float ss = 0.f;
    for (int64_t d = 0; d < D; ++d) ss += f32(x[d]) * f32(x[d]);
    const float r = 1.f / std::sqrt(ss / D + eps);
    for (int64_t d = 0; d < D; ++d) Y[m * D + d] = T(f32(W[d]) * f32(T(f32(x[d]) * r)));
  }
}

torch::Tensor rmsnorm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && x.scalar_type() == w.scalar_type());
  const int64_t D = x.size(-1), M = x.numel() / D;
  TORCH_CHECK(w.numel() == D);
  auto y = torch::empty_like(x);
  if (x.scalar_type() == torch::kBFloat16)
    rmsnorm_rows(x.data_ptr<at::BFloat16>(), w.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(), M, D, eps);
  else
    rmsnorm_rows(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), M, D, eps);
  return y;
}

// SwiGLU's product from the fused gate|up output: y = T(T(silu(gate)) * up) over [M, 2F] -> [M, F].
template <class T>
void silu_mul_rows(const T* GU, T* Y, int64_t M, int64_t F) {
  float buf[16];
  for (int64_t m = 0; m < M; ++m) {
    const T* g = GU + m * 2 * F;
    const T* u = g + F;
    for (int64_t i = 0; i < F; i += 16) {
      const int64_t n = std::min<int64_t>(16, F - i);
      for (int64_t j = 0; j < 16; ++j) buf[j] = j < n ? f32(g[i + j]) : 0.f;
      const __m512 x = _mm512_loadu_ps(buf);  // silu(x) = x / (1 + e^-x), e^-|x| keeps exp's input <= 0
      const __m512 e = exp_nonpos(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));
      const __m512 one = _mm512_set1_ps(1.f);
      const __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
      const __m512 sig = _mm512_mask_div_ps(_mm512_div_ps(one, _mm512_add_ps(one, e)), neg, e, _mm512_add_ps(one, e));
      _mm512_storeu_ps(buf, _mm512_mul_ps(x, sig));
      for (int64_t j = 0; j < n; ++j) Y[m * F + i + j] = T(f32(T(buf[j])) * f32(u[i + j]));
    }
  }
}

torch::Tensor silu_mul(torch::Tensor gu) {
  TORCH_CHECK(gu.is_contiguous() && gu.size(-1) % 2 == 0);
  const int64_t F = gu.size(-1) / 2, M = gu.numel() / (2 * F);
  auto sizes = gu.sizes().vec();
  sizes.back() = F;
  auto y = torch::empty(sizes, gu.options());
  if (gu.scalar_type() == torch::kBFloat16)
    silu_mul_rows(gu.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(), M, F);
  else
    silu_mul_rows(gu.data_ptr<float>(), y.data_ptr<float>(), M, F);
  return y;
}

// Interleaved RoPE as layers.apply_interleaved_rope computes it: pairs (2j, 2j+1) of x [B, N, S, D] (any strides
// but the last) turned by cos/sin [B, S, D/2] in fp32, out contiguous in x's dtype.
template <class T>
void rope_rows(const T* X, const int64_t* xs, const float* C, const float* Sn, T* Y, int64_t B, int64_t N,
               int64_t S, int64_t D) {
  const int64_t P = D / 2;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t l = 0; l < S; ++l) {
        const T* x = X + b * xs[0] + n * xs[1] + l * xs[2];
        const float* c = C + (b * S + l) * P;
        const float* sn = Sn + (b * S + l) * P;
        T* y = Y + ((b * N + n) * S + l) * D;
        for (int64_t j = 0; j < P; ++j) {
          const float x0 = f32(x[2 * j]), x1 = f32(x[2 * j + 1]);
          y[2 * j] = T(x0 * c[j] - x1 * sn[j]);
          y[2 * j + 1] = T(x1 * c[j] + x0 * sn[j]);
        }
      }
}

torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  const int64_t B = x.size(0), N = x.size(1), S = x.size(2), D = x.size(3);
  TORCH_CHECK(x.stride(3) == 1 && D % 2 == 0 && cos.is_contiguous() && sin.is_contiguous());
  TORCH_CHECK(cos.scalar_type() == torch::kFloat && sin.scalar_type() == torch::kFloat && cos.numel() == B * S * D / 2);
  auto y = torch::empty({B, N, S, D}, x.options());
  const int64_t xs[3] = {x.stride(0), x.stride(1), x.stride(2)};
  if (x.scalar_type() == torch::kBFloat16)
    rope_rows(x.data_ptr<at::BFloat16>(), xs, cos.data_ptr<float>(), sin.data_ptr<float>(),
              y.data_ptr<at::BFloat16>(), B, N, S, D);
  else
    rope_rows(x.data_ptr<float>(), xs, cos.data_ptr<float>(), sin.data_ptr<float>(), y.data_ptr<float>(), B, N, S, D);
  return y;
}

// Attention of one query per row over a KV cache: q [B, H, 1, D] contiguous; k, v [B, KV, L, D] views whose
// last dim is contiguous (a cache buffer's first L positions); allowed [B, L] bool or empty (all allowed);
// D % 16 == 0, D <= 256. Query head h reads KV head h / (H / KV). One task per (row, KV head): the KV head's keys
// and values are read once for its H / KV query heads; scores, softmax and sums in fp32; out [B, H, 1, D] in T.
template <class T>
void one_query_attention(const T* Q, const T* K, const T* V, const bool* A, T* O, int64_t B, int64_t H,
                         int64_t KV, int64_t L, int64_t D, const int64_t* ks, const int64_t* vs, float scale) {
  const int64_t G = H / KV, C = D / 16;
  at::parallel_for(0, B * KV, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> s(G * L);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / KV, g = t % KV;
      const T* k = K + b * ks[0] + g * ks[1];
      const T* v = V + b * vs[0] + g * vs[1];
      const bool* a = A ? A + b * L : nullptr;
      __m512 q[16 * 16];  // G <= 16 heads x C <= 16 chunks
      for (int64_t h = 0; h < G; ++h)
        for (int64_t c = 0; c < C; ++c)
          q[h * C + c] = _mm512_mul_ps(load16(Q + ((b * H + g * G + h) * D) + 16 * c), _mm512_set1_ps(scale));
      for (int64_t j = 0; j < L; ++j) {
        if (a && !a[j]) {
          for (int64_t h = 0; h < G; ++h) s[h * L + j] = -INFINITY;
          continue;
        }
        __m512 kj[16];
        for (int64_t c = 0; c < C; ++c) kj[c] = load16(k + j * ks[2] + 16 * c);
        for (int64_t h = 0; h < G; ++h) {
          __m512 acc = _mm512_mul_ps(q[h * C], kj[0]);
          for (int64_t c = 1; c < C; ++c) acc = _mm512_fmadd_ps(q[h * C + c], kj[c], acc);
          s[h * L + j] = _mm512_reduce_add_ps(acc);
        }
      }
      for (int64_t h = 0; h < G; ++h) {
        float* sh = s.data() + h * L;
        float mx = -INFINITY;
        for (int64_t j = 0; j < L; ++j) mx = std::max(mx, sh[j]);
        __m512 total = _mm512_setzero_ps();
        int64_t j = 0;
        for (; j + 16 <= L; j += 16) {
          const __m512 e = exp_nonpos(_mm512_sub_ps(_mm512_loadu_ps(sh + j), _mm512_set1_ps(mx)));
          _mm512_storeu_ps(sh + j, e);
          total = _mm512_add_ps(total, e);
        }
        float sum = _mm512_reduce_add_ps(total);
        if (j < L) {
          const __mmask16 tail = (__mmask16)((1u << (L - j)) - 1);
          const __m512 x = _mm512_maskz_loadu_ps(tail, sh + j);
          const __m512 e = _mm512_maskz_mov_ps(tail, exp_nonpos(_mm512_sub_ps(x, _mm512_set1_ps(mx))));
          _mm512_mask_storeu_ps(sh + j, tail, e);
          sum += _mm512_reduce_add_ps(e);
        }
        __m512 acc[16];
        for (int64_t c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps();
        for (int64_t jj = 0; jj < L; ++jj) {
          if (sh[jj] == 0.f) continue;
          const __m512 p = _mm512_set1_ps(sh[jj]);
          for (int64_t c = 0; c < C; ++c) acc[c] = _mm512_fmadd_ps(p, load16(v + jj * vs[2] + 16 * c), acc[c]);
        }
        float out[16];
        T* o = O + (b * H + g * G + h) * D;
        for (int64_t c = 0; c < C; ++c) {
          _mm512_storeu_ps(out, _mm512_div_ps(acc[c], _mm512_set1_ps(sum)));
          for (int i = 0; i < 16; ++i) o[16 * c + i] = T(out[i]);
        }
      }
    }
  });
}

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor allowed,
                               double scale) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), KV = k.size(1), L = k.size(2);
  TORCH_CHECK(q.is_contiguous() && q.size(2) == 1 && D % 16 == 0 && D <= 256 && H % KV == 0 && H / KV <= 16);
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1 && k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == D);
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type());
  const bool* A = nullptr;
  if (allowed.numel()) {
    TORCH_CHECK(allowed.scalar_type() == torch::kBool && allowed.is_contiguous() && allowed.numel() == B * L);
    A = allowed.data_ptr<bool>();
  }
  auto o = torch::empty_like(q);
  const int64_t ks[3] = {k.stride(0), k.stride(1), k.stride(2)}, vs[3] = {v.stride(0), v.stride(1), v.stride(2)};
  if (q.scalar_type() == torch::kBFloat16)
    one_query_attention(q.data_ptr<at::BFloat16>(), k.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>(), A,
                        o.data_ptr<at::BFloat16>(), B, H, KV, L, D, ks, vs, scale);
  else
    one_query_attention(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), A, o.data_ptr<float>(), B,
                        H, KV, L, D, ks, vs, scale);
  return o;
}

// ---- A decoder layer's decode step in two calls: the attention half and the dense MLP half, each from its
// RMSNorm through its residual add, composed of the ops above in the eager code's order and roundings (so the
// same numbers). One call instead of ~20 torch ops and ~6 module calls from Python per half.

// x2 [M, K] @ W^T in x2's dtype. W is w [N, K] (the bf16 matvec kernel for bf16, torch's linear otherwise) or,
// with sz non-empty, int4 tiles w with their (scale, zero) pairs sz in groups of `group` (the int4 kernel).
static torch::Tensor matvec(torch::Tensor x2, torch::Tensor w, torch::Tensor sz, int64_t group) {
  if (sz.numel()) return gemv_int4(x2.to(torch::kFloat).contiguous(), w, sz, group).to(x2.scalar_type());
  if (x2.scalar_type() == torch::kBFloat16 && w.scalar_type() == torch::kBFloat16 && x2.size(1) % 32 == 0)
    return gemv_bf16_to<at::BFloat16>(x2.contiguous(), w);
  return at::linear(x2, w);
}

// h [B, 1, E] -> h + o_proj(attention(rope(qkv_proj(rmsnorm(h))))), writing this position's K and V into the
// cache buffers kbuf, vbuf [B, KV, max_len, D] at `start` and attending over positions 0..start. Each linear
// comes as (w, sz, group), see matvec.
torch::Tensor decode_attention_block(torch::Tensor h, torch::Tensor ln, double eps, torch::Tensor wqkv,
                                     torch::Tensor sqkv, int64_t gqkv, torch::Tensor wo, torch::Tensor so,
                                     int64_t go, torch::Tensor cos, torch::Tensor sin, torch::Tensor kbuf,
                                     torch::Tensor vbuf, int64_t start, torch::Tensor allowed, double scale) {
  const int64_t B = h.size(0), E = h.size(2), KV = kbuf.size(1), D = kbuf.size(3);
  auto qkv = matvec(rmsnorm(h, ln, eps).view({B, E}), wqkv, sqkv, gqkv);
  TORCH_CHECK(h.size(1) == 1 && start < kbuf.size(2) && qkv.size(1) % D == 0);
  const int64_t N = qkv.size(1) / D, H = N - 2 * KV;
  auto heads = qkv.view({B, 1, N, D}).transpose(1, 2);
  auto qk = rope(heads.narrow(1, 0, H + KV), cos, sin);
  kbuf.narrow(2, start, 1).copy_(qk.narrow(1, H, KV));
  vbuf.narrow(2, start, 1).copy_(heads.narrow(1, H + KV, KV));
  auto out = decode_attention(qk.narrow(1, 0, H).contiguous(), kbuf.narrow(2, 0, start + 1),
                              vbuf.narrow(2, 0, start + 1), allowed, scale);
  return h + matvec(out.view({B, H * D}), wo, so, go).view({B, 1, E});
}

// h [B, 1, E] -> h + down(silu(gate) * up) of rmsnorm(h), gate|up one matrix; linears as in matvec.
torch::Tensor decode_mlp_block(torch::Tensor h, torch::Tensor ln, double eps, torch::Tensor wgu, torch::Tensor sgu,
                               int64_t ggu, torch::Tensor wd, torch::Tensor sd, int64_t gd) {
  const int64_t B = h.size(0), E = h.size(2);
  auto act = silu_mul(matvec(rmsnorm(h, ln, eps).view({B, E}), wgu, sgu, ggu));
  return h + matvec(act, wd, sd, gd).view({B, 1, E});
}

// ---- A MoE layer's decode half (spec §2) in one call: h + shared(x) + sum_k w_k expert_k(x), x = rmsnorm(h),
// the experts chosen by one group's fp32 router. The same ops in the same order as MoEBlock's eager path for
// few rows (router and the sorted-by-expert sum through ATen, each expert as ExpertGroup.expert /
// QuantExpertGroup.expert compute it), so the same numbers; only the experts a row picked are read.

// One expert on its rows: bf16 weights give gate|up in fp32 and the SwiGLU product rounded to bf16 once (the
// bf16 matvec's decode form); int4 tiles (s1 non-empty) run as matvec does.
static torch::Tensor expert_rows(torch::Tensor xs, const torch::Tensor& w1, const torch::Tensor& s1,
                                 const torch::Tensor& w2, const torch::Tensor& s2, int64_t group) {
  if (s1.defined()) return matvec(silu_mul(matvec(xs, w1, s1, group)), w2, s2, group);
  auto act = silu_mul(gemv_bf16_to<float>(xs.contiguous(), w1)).to(torch::kBFloat16);
  return gemv_bf16_to<at::BFloat16>(act, w2);
}

// h [B, 1, E]; router [X, E] fp32 and bias [X] (selection only); expert e is (w1[e], s1[e]) -> (w2[e], s2[e]) with
// s1, s2 empty lists for bf16 weights; the shared SwiGLU's linears as in matvec (sw1 empty: no shared experts).
torch::Tensor decode_moe_block(torch::Tensor h, torch::Tensor ln, double eps, torch::Tensor router,
                               torch::Tensor bias, int64_t topk, double norm_min, std::vector<torch::Tensor> w1,
                               std::vector<torch::Tensor> s1, std::vector<torch::Tensor> w2,
                               std::vector<torch::Tensor> s2, int64_t group, torch::Tensor sw1, torch::Tensor ss1,
                               int64_t sg1, torch::Tensor sw2, torch::Tensor ss2, int64_t sg2) {
  const int64_t B = h.size(0), E = h.size(2), X = static_cast<int64_t>(w1.size());
  TORCH_CHECK(h.size(1) == 1 && router.size(0) == X && w2.size() == w1.size());
  TORCH_CHECK(s1.empty() ? s2.empty() : (s1.size() == w1.size() && s2.size() == w1.size()));
  auto x = rmsnorm(h, ln, eps).view({B, E});
  auto out = sw1.numel() ? matvec(silu_mul(matvec(x, sw1, ss1, sg1)), sw2, ss2, sg2) : torch::zeros_like(x);
  auto probs = at::linear(x.to(torch::kFloat), router).softmax(-1);
  auto ids = std::get<1>(at::topk(probs + bias, topk, -1));
  auto weights = probs.gather(-1, ids);
  weights = (weights / weights.sum(-1, true).clamp_min(norm_min)).to(x.scalar_type());
  auto flat = ids.reshape(-1);
  auto order = at::argsort(flat, true, 0, false);
  auto token = at::floor_divide(order, topk);
  auto xs = x.index_select(0, token);
  auto ys = torch::empty_like(xs);
  const auto counts = at::bincount(flat, {}, X);
  const int64_t* C = counts.data_ptr<int64_t>();
  const torch::Tensor none;  // bf16 experts: no scales
  for (int64_t e = 0, start = 0; e < X; start += C[e], ++e)
    if (C[e])
      ys.narrow(0, start, C[e]).copy_(expert_rows(xs.narrow(0, start, C[e]), w1[e], s1.empty() ? none : s1[e],
                                                  w2[e], s2.empty() ? none : s2[e], group));
  ys = ys * weights.reshape(-1).index_select(0, order).unsqueeze(1);
  return h + (out + torch::zeros_like(x).index_add_(0, token, ys)).view({B, 1, E});
}
