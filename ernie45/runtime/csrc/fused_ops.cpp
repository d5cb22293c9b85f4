// The fused decode ops (compiled after matvec.cpp, in one unit: see kernels.py).

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

// Lane i of the result = the sum of a[i]'s 16 lanes: 16 horizontal sums in 45 shuffles and adds, where one
// _mm512_reduce_add_ps per vector would take ~8 dependent steps each.
static inline __m512 sum16(const __m512* a) {
  __m512 b[8], c[4];
  for (int k = 0; k < 8; ++k)  // per 128-bit lane: [x0+x2, y0+y2, x1+x3, y1+y3] of x = a[2k], y = a[2k+1]
    b[k] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * k], a[2 * k + 1]), _mm512_unpackhi_ps(a[2 * k], a[2 * k + 1]));
  for (int k = 0; k < 4; ++k)  // per lane: the lane's sums of a[4k], ..., a[4k + 3]
    c[k] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * k], b[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(b[2 * k], b[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 e0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 e1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(e0, e1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(e0, e1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// Attention of one query per row over a KV cache: q [B, H, 1, D] contiguous; k, v [B, KV, L, D] views whose
// last dim is contiguous (a cache buffer's first L positions); allowed [B, L] bool or empty (all allowed);
// D % 16 == 0, D <= 256. Query head h reads KV head h / (H / KV). One task per (row, KV head): the KV head's keys
// and values are read once for its G = H / KV query heads; scores, softmax and sums in fp32; out [B, H, 1, D] in T.
// At depth this is compute, not bandwidth (the cache of a layer fits the L3): G is a template argument so that
// the G running sums stay in registers (with G known only at run time they lived on the stack, and every
// multiply-add waited for the one before through memory), the bf16 scores are taken 16 keys at a time (one
// `sum16` for 16 dot products), bf16 values are summed two keys per dpbf16, and the values are summed tile by tile
// (TILE keys, whose rows stay in L1 while every 16 columns are added) instead of one pass over the cache per 16.
struct QueryTask {
  int64_t L, D;
  const int64_t *ks, *vs;
  float scale;
};

template <class T, int G>
static void attend_group(const QueryTask& a, const T* Q, const T* k, const T* v, const bool* allowed, T* O,
                         float* s, uint16_t* pb, float* acc_out) {
  constexpr int64_t TILE = 64;
  const int64_t L = a.L, D = a.D, C = D / 16;
  int64_t j = 0;
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (D % 32 == 0) {  // bf16 pairs straight into fp32 (exact products): half the instructions, no widening
      for (; j + 16 <= L; j += 16)  // (masked keys too: their scores are overwritten below)
        for (int h = 0; h < G; ++h) {
          const uint16_t* qr = reinterpret_cast<const uint16_t*>(Q + h * D);
          __m512bh qv[8];
          for (int64_t c = 0; c < D / 32; ++c) qv[c] = (__m512bh)_mm512_loadu_si512(qr + 32 * c);
          __m512 dots[16];
          for (int u = 0; u < 16; ++u) {
            const uint16_t* kr = reinterpret_cast<const uint16_t*>(k + (j + u) * a.ks[2]);
            __m512 acc = _mm512_setzero_ps();
            for (int64_t c = 0; c < D / 32; ++c)
              acc = _mm512_dpbf16_ps(acc, qv[c], (__m512bh)_mm512_loadu_si512(kr + 32 * c));
            dots[u] = acc;
          }
          _mm512_storeu_ps(s + h * L + j, _mm512_mul_ps(sum16(dots), _mm512_set1_ps(a.scale)));
        }
    }
  }
  if (j < L) {
    __m512 q[G * 16];  // the scaled query heads, C <= 16 chunks each
    for (int h = 0; h < G; ++h)
      for (int64_t c = 0; c < C; ++c) q[h * C + c] = _mm512_mul_ps(load16(Q + h * D + 16 * c), _mm512_set1_ps(a.scale));
    for (; j < L; ++j) {
      if (allowed && !allowed[j]) continue;
      __m512 kj[16];
      for (int64_t c = 0; c < C; ++c) kj[c] = load16(k + j * a.ks[2] + 16 * c);
      for (int h = 0; h < G; ++h) {
        __m512 acc = _mm512_mul_ps(q[h * C], kj[0]);
        for (int64_t c = 1; c < C; ++c) acc = _mm512_fmadd_ps(q[h * C + c], kj[c], acc);
        s[h * L + j] = _mm512_reduce_add_ps(acc);
      }
    }
  }
  if (allowed)
    for (int64_t jj = 0; jj < L; ++jj)
      if (!allowed[jj])
        for (int h = 0; h < G; ++h) s[h * L + jj] = -INFINITY;
  float sums[G];
  for (int h = 0; h < G; ++h) {
    float* sh = s + h * L;
    float mx = -INFINITY;
    for (int64_t jj = 0; jj < L; ++jj) mx = std::max(mx, sh[jj]);
    __m512 total = _mm512_setzero_ps();
    int64_t jj = 0;
    for (; jj + 16 <= L; jj += 16) {
      const __m512 e = exp_nonpos(_mm512_sub_ps(_mm512_loadu_ps(sh + jj), _mm512_set1_ps(mx)));
      _mm512_storeu_ps(sh + jj, e);
      total = _mm512_add_ps(total, e);
    }
    float sum = _mm512_reduce_add_ps(total);
    if (jj < L) {
      const __mmask16 tail = (__mmask16)((1u << (L - jj)) - 1);
      const __m512 x = _mm512_maskz_loadu_ps(tail, sh + jj);
      const __m512 e = _mm512_maskz_mov_ps(tail, exp_nonpos(_mm512_sub_ps(x, _mm512_set1_ps(mx))));
      _mm512_mask_storeu_ps(sh + jj, tail, e);
      sum += _mm512_reduce_add_ps(e);
    }
    sums[h] = sum;
  }
  // out[h] = sum_j p[h, j] v[j] / sums[h]: per 16 columns of v, all G heads at once, so each value is loaded
  // (and widened) once for the group instead of once per head. Zero weights (masked positions, whose cache
  // slots may hold anything) are skipped; a weight that underflowed to 0 adds an exact 0. Each head's sum runs
  // over j in order, as one head at a time would.
  std::fill(acc_out, acc_out + G * D, 0.f);
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    // bf16 values: the weights rounded to bf16 (as torch's CPU flash attention feeds its bf16 P @ V), so one
    // dpbf16 adds two keys' values to 16 columns: [v_j | v_j+1] interleaved by 16-bit lanes, times (p_j, p_j+1).
    const int64_t W = L + 1;  // (a zero after the last key: an odd count's last pair)
    for (int h = 0; h < G; ++h) {
      const float* sh = s + h * L;
      uint16_t* ph = pb + h * W;
      int64_t jj = 0;
      for (; jj + 16 <= L; jj += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(ph + jj), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(sh + jj)));
      for (; jj < L; ++jj) ph[jj] = c10::BFloat16(sh[jj]).x;
      ph[L] = 0;
    }
#ifndef ERNIE45_AVX2
    alignas(64) uint16_t order[32];
    for (int i = 0; i < 16; ++i) order[2 * i] = i, order[2 * i + 1] = 32 + i;
    const __m512i interleave = _mm512_load_si512(order);
#endif
    const uint16_t* vb = reinterpret_cast<const uint16_t*>(v);
    for (int64_t j0 = 0; j0 < L; j0 += TILE) {  // (TILE is even: pairs never straddle two tiles)
      const int64_t j1 = std::min(L, j0 + TILE);
      for (int64_t c = 0; c < C; ++c) {
        __m512 acc[G];
        for (int h = 0; h < G; ++h) acc[h] = _mm512_load_ps(acc_out + h * D + 16 * c);
        for (int64_t jj = j0; jj < j1; jj += 2) {
          // a masked key's slot may hold anything (NaN x 0 is NaN): its values are read as zeros
          const bool first = !allowed || allowed[jj], second = jj + 1 < L && (!allowed || allowed[jj + 1]);
          if (!first && !second) continue;
          const __m256i x0 = first ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vb + jj * a.vs[2] + 16 * c))
                                   : _mm256_setzero_si256();
          const __m256i x1 = second
              ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vb + (jj + 1) * a.vs[2] + 16 * c))
              : _mm256_setzero_si256();
#ifdef ERNIE45_AVX2  // (a 64-word permute, as two 16-bit unpacks and their 128-bit lanes put in order)
          const __m256i even = _mm256_unpacklo_epi16(x0, x1), odd = _mm256_unpackhi_epi16(x0, x1);
          __m512bh pair;
          pair.lo = _mm256_permute2x128_si256(even, odd, 0x20);
          pair.hi = _mm256_permute2x128_si256(even, odd, 0x31);
#else
          const __m512bh pair = (__m512bh)_mm512_permutex2var_epi16(_mm512_castsi256_si512(x0), interleave,
                                                                    _mm512_castsi256_si512(x1));
#endif
          for (int h = 0; h < G; ++h) {
            int32_t w;
            std::memcpy(&w, pb + h * W + jj, 4);
            acc[h] = _mm512_dpbf16_ps(acc[h], pair, (__m512bh)_mm512_set1_epi32(w));
          }
        }
        for (int h = 0; h < G; ++h) _mm512_store_ps(acc_out + h * D + 16 * c, acc[h]);
      }
    }
  } else {
    for (int64_t j0 = 0; j0 < L; j0 += TILE) {
      const int64_t j1 = std::min(L, j0 + TILE);
      for (int64_t c = 0; c < C; ++c) {
        __m512 acc[G];
        for (int h = 0; h < G; ++h) acc[h] = _mm512_load_ps(acc_out + h * D + 16 * c);
        for (int64_t jj = j0; jj < j1; ++jj) {
          if (allowed && !allowed[jj]) continue;
          const __m512 vj = load16(v + jj * a.vs[2] + 16 * c);
          for (int h = 0; h < G; ++h) acc[h] = _mm512_fmadd_ps(_mm512_set1_ps(s[h * L + jj]), vj, acc[h]);
        }
        for (int h = 0; h < G; ++h) _mm512_store_ps(acc_out + h * D + 16 * c, acc[h]);
      }
    }
  }
  float out[16];
  for (int h = 0; h < G; ++h)
    for (int64_t c = 0; c < C; ++c) {
      T* o = O + h * D + 16 * c;
      _mm512_storeu_ps(out, _mm512_div_ps(_mm512_load_ps(acc_out + h * D + 16 * c), _mm512_set1_ps(sums[h])));
      for (int i = 0; i < 16; ++i) o[i] = T(out[i]);
    }
}

template <class T, int... Gs>
static auto group_kernels(std::integer_sequence<int, Gs...>) {
  using Fn = void (*)(const QueryTask&, const T*, const T*, const T*, const bool*, T*, float*, uint16_t*, float*);
  return std::array<Fn, sizeof...(Gs)>{&attend_group<T, Gs + 1>...};
}

template <class T>
void one_query_attention(const T* Q, const T* K, const T* V, const bool* A, T* O, int64_t B, int64_t H,
                         int64_t KV, int64_t L, int64_t D, const int64_t* ks, const int64_t* vs, float scale) {
  const int64_t G = H / KV;
  static const auto by_group = group_kernels<T>(std::make_integer_sequence<int, 16>());  // G = 1..16
  const QueryTask task{L, D, ks, vs, scale};
  at::parallel_for(0, B * KV, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> s(G * L);
    std::vector<uint16_t> pb(std::is_same_v<T, at::BFloat16> ? G * (L + 1) : 0);  // bf16 weights (values in bf16)
    alignas(64) float acc_out[16 * 256];  // G <= 16 heads x D <= 256 columns
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / KV, g = t % KV;
      by_group[G - 1](task, Q + (b * H + g * G) * D, K + b * ks[0] + g * ks[1], V + b * vs[0] + g * vs[1],
                      A ? A + b * L : nullptr, O + (b * H + g * G) * D, s.data(), pb.data(), acc_out);
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

