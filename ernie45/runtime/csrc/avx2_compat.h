// The AVX-512 intrinsics the kernels use, written with AVX2 + FMA: the kernels' build for CPUs without AVX512-BF16
// (an AMD EPYC of the Zen 3 generation, older Intel parts). Included first in that build only (kernels.py), it
// renames each `_mm512_*` the kernels call and the 512-bit types to the stand-ins below, so the kernels' source is
// the same for both builds. A 512-bit value is two 256-bit halves; each stand-in computes what the AVX-512
// instruction computes, lane by lane, in the same order (a horizontal sum adds as GCC's `_mm512_reduce_add_ps`
// does; a bf16 dot product adds the odd pair's product first, as VDPBF16PS does). Two are narrower than the
// instruction and hold for the kernels' operands only, as said at each. The few places where the stand-in would
// be slow (a 128-byte or 64-word permute) have their own AVX2 code in the kernels, under `ERNIE45_AVX2`.
#pragma once
// torch's headers before the renames below, which would otherwise reach into them
#include <torch/library.h>
#include <torch/types.h>
#include <immintrin.h>

#include <cstdint>

#define E45_INLINE static inline __attribute__((always_inline))

struct e45_v16f {  // 16 fp32
  __m256 lo, hi;
};
struct e45_v16i {  // 512 bits of integers
  __m256i lo, hi;
};
struct e45_v32bh {  // 32 bf16 (a cast from the integer vector, as (__m512bh) is)
  __m256i lo, hi;
  e45_v32bh() = default;
  explicit e45_v32bh(const e45_v16i& x) : lo(x.lo), hi(x.hi) {}
};

// ---- fp32
E45_INLINE e45_v16f e45_set1_ps(float f) { return {_mm256_set1_ps(f), _mm256_set1_ps(f)}; }
E45_INLINE e45_v16f e45_setzero_ps() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
E45_INLINE e45_v16f e45_loadu_ps(const void* p) {
  const float* f = static_cast<const float*>(p);
  return {_mm256_loadu_ps(f), _mm256_loadu_ps(f + 8)};
}
E45_INLINE void e45_storeu_ps(void* p, e45_v16f a) {
  float* f = static_cast<float*>(p);
  _mm256_storeu_ps(f, a.lo);
  _mm256_storeu_ps(f + 8, a.hi);
}
#define E45_BINARY_PS(name, op) \
  E45_INLINE e45_v16f name(e45_v16f a, e45_v16f b) { return {op(a.lo, b.lo), op(a.hi, b.hi)}; }
E45_BINARY_PS(e45_add_ps, _mm256_add_ps)
E45_BINARY_PS(e45_sub_ps, _mm256_sub_ps)
E45_BINARY_PS(e45_mul_ps, _mm256_mul_ps)
E45_BINARY_PS(e45_div_ps, _mm256_div_ps)
E45_BINARY_PS(e45_max_ps, _mm256_max_ps)
E45_BINARY_PS(e45_unpacklo_ps, _mm256_unpacklo_ps)  // (within each 128-bit lane, as the 512-bit form)
E45_BINARY_PS(e45_unpackhi_ps, _mm256_unpackhi_ps)
E45_INLINE e45_v16f e45_fmadd_ps(e45_v16f a, e45_v16f b, e45_v16f c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
E45_INLINE e45_v16f e45_abs_ps(e45_v16f a) {
  const __m256 m = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  return {_mm256_and_ps(a.lo, m), _mm256_and_ps(a.hi, m)};
}
E45_INLINE float e45_reduce_add_ps(e45_v16f a) {  // (upper + lower) halves down to one lane, as GCC's macro
  const __m256 t3 = _mm256_add_ps(a.hi, a.lo);
  const __m128 t6 = _mm_add_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
  const __m128 t8 = _mm_add_ps(t6, _mm_shuffle_ps(t6, t6, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(t8) + _mm_cvtss_f32(_mm_shuffle_ps(t8, t8, 1));
}
// vrndscaleps keeps 2^-M fractions (M = imm[7:4]) and rounds by imm[3:0], which vroundps reads alike; M = 0 only
template <int imm>
E45_INLINE e45_v16f e45_roundscale_ps(e45_v16f a) {
  static_assert((imm >> 4) == 0, "the AVX2 stand-in rounds to whole numbers only (imm[7:4] = 0)");
  return {_mm256_round_ps(a.lo, imm & 0x0F), _mm256_round_ps(a.hi, imm & 0x0F)};
}
// p * 2^n for whole n in [-250, 127] (exp's use: n <= 0): two exact powers of two, so the product rounds once,
// where it leaves the normal range, as vscalefps rounds it.
E45_INLINE __m256 e45_pow2(__m256 n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
E45_INLINE __m256 e45_scalef8(__m256 p, __m256 n) {
  const __m256 first = _mm256_max_ps(n, _mm256_set1_ps(-125.f));
  return _mm256_mul_ps(_mm256_mul_ps(p, e45_pow2(first)), e45_pow2(_mm256_sub_ps(n, first)));
}
E45_INLINE e45_v16f e45_scalef_ps(e45_v16f p, e45_v16f n) { return {e45_scalef8(p.lo, n.lo), e45_scalef8(p.hi, n.hi)}; }

// masks: bit i <-> lane i
E45_INLINE __m256 e45_lanes8(unsigned bits) {
  const __m256i each = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(bits), each), each));
}
template <int imm>
E45_INLINE __mmask16 e45_cmp_ps_mask(e45_v16f a, e45_v16f b) {
  const unsigned lo = _mm256_movemask_ps(_mm256_cmp_ps(a.lo, b.lo, imm));
  return static_cast<__mmask16>(lo | (unsigned(_mm256_movemask_ps(_mm256_cmp_ps(a.hi, b.hi, imm))) << 8));
}
E45_INLINE e45_v16f e45_mask_blend_ps(__mmask16 k, e45_v16f a, e45_v16f b) {  // bit set: b's lane
  return {_mm256_blendv_ps(a.lo, b.lo, e45_lanes8(k & 0xFF)), _mm256_blendv_ps(a.hi, b.hi, e45_lanes8(k >> 8))};
}
E45_INLINE e45_v16f e45_mask_div_ps(e45_v16f src, __mmask16 k, e45_v16f a, e45_v16f b) {
  return e45_mask_blend_ps(k, src, e45_div_ps(a, b));
}
E45_INLINE e45_v16f e45_maskz_mov_ps(__mmask16 k, e45_v16f a) {
  return {_mm256_and_ps(a.lo, e45_lanes8(k & 0xFF)), _mm256_and_ps(a.hi, e45_lanes8(k >> 8))};
}
E45_INLINE e45_v16f e45_maskz_loadu_ps(__mmask16 k, const void* p) {  // unselected lanes are not read
  const float* f = static_cast<const float*>(p);
  return {_mm256_maskload_ps(f, _mm256_castps_si256(e45_lanes8(k & 0xFF))),
          _mm256_maskload_ps(f + 8, _mm256_castps_si256(e45_lanes8(k >> 8)))};
}
E45_INLINE void e45_mask_storeu_ps(void* p, __mmask16 k, e45_v16f a) {
  float* f = static_cast<float*>(p);
  _mm256_maskstore_ps(f, _mm256_castps_si256(e45_lanes8(k & 0xFF)), a.lo);
  _mm256_maskstore_ps(f + 8, _mm256_castps_si256(e45_lanes8(k >> 8)), a.hi);
}

template <int imm>  // (within each 128-bit lane, as the 512-bit form)
E45_INLINE e45_v16f e45_shuffle_ps(e45_v16f a, e45_v16f b) {
  return {_mm256_shuffle_ps(a.lo, b.lo, imm), _mm256_shuffle_ps(a.hi, b.hi, imm)};
}
// 128-bit lanes: a's lanes imm[1:0], imm[3:2], then b's imm[5:4], imm[7:6]; lanes 0-3 of a 512-bit value are
// exactly vperm2f128's selectors 0-3 over (lo, hi)
template <int imm>
E45_INLINE e45_v16f e45_shuffle_f32x4(e45_v16f a, e45_v16f b) {
  return {_mm256_permute2f128_ps(a.lo, a.hi, (imm & 3) | (((imm >> 2) & 3) << 4)),
          _mm256_permute2f128_ps(b.lo, b.hi, ((imm >> 4) & 3) | (((imm >> 6) & 3) << 4))};
}
// lane i <- the 32-float table a | b at idx[i] (mod 32)
E45_INLINE __m256 e45_pick8(__m256 t0, __m256 t1, __m256 t2, __m256 t3, __m256i idx) {
  const __m256 bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)), bit4 = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 27));
  const __m256 low = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t0, idx), _mm256_permutevar8x32_ps(t1, idx), bit3);
  const __m256 high = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t2, idx), _mm256_permutevar8x32_ps(t3, idx), bit3);
  return _mm256_blendv_ps(low, high, bit4);
}
E45_INLINE e45_v16f e45_permutex2var_ps(e45_v16f a, e45_v16i idx, e45_v16f b) {
  return {e45_pick8(a.lo, a.hi, b.lo, b.hi, idx.lo), e45_pick8(a.lo, a.hi, b.lo, b.hi, idx.hi)};
}

// ---- integers
E45_INLINE e45_v16i e45_loadu_si512(const void* p) {
  const __m256i* v = static_cast<const __m256i*>(p);
  return {_mm256_loadu_si256(v), _mm256_loadu_si256(v + 1)};
}
E45_INLINE void e45_storeu_si512(void* p, e45_v16i a) {
  __m256i* v = static_cast<__m256i*>(p);
  _mm256_storeu_si256(v, a.lo);
  _mm256_storeu_si256(v + 1, a.hi);
}
E45_INLINE e45_v16i e45_setzero_si512() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
E45_INLINE e45_v16i e45_set1_epi32(int x) { return {_mm256_set1_epi32(x), _mm256_set1_epi32(x)}; }
E45_INLINE e45_v16i e45_set1_epi8(char x) { return {_mm256_set1_epi8(x), _mm256_set1_epi8(x)}; }
E45_INLINE e45_v16i e45_set_epi32(int e15, int e14, int e13, int e12, int e11, int e10, int e9, int e8, int e7, int e6,
                                  int e5, int e4, int e3, int e2, int e1, int e0) {
  return {_mm256_set_epi32(e7, e6, e5, e4, e3, e2, e1, e0), _mm256_set_epi32(e15, e14, e13, e12, e11, e10, e9, e8)};
}
E45_INLINE e45_v16i e45_and_si512(e45_v16i a, e45_v16i b) {
  return {_mm256_and_si256(a.lo, b.lo), _mm256_and_si256(a.hi, b.hi)};
}
E45_INLINE e45_v16i e45_srli_epi16(e45_v16i a, int n) { return {_mm256_srli_epi16(a.lo, n), _mm256_srli_epi16(a.hi, n)}; }
E45_INLINE e45_v16i e45_slli_epi32(e45_v16i a, int n) { return {_mm256_slli_epi32(a.lo, n), _mm256_slli_epi32(a.hi, n)}; }
E45_INLINE e45_v16i e45_abs_epi8(e45_v16i a) { return {_mm256_abs_epi8(a.lo), _mm256_abs_epi8(a.hi)}; }
E45_INLINE e45_v16i e45_cvtepu16_epi32(__m256i h) {
  return {_mm256_cvtepu16_epi32(_mm256_castsi256_si128(h)), _mm256_cvtepu16_epi32(_mm256_extracti128_si256(h, 1))};
}
E45_INLINE e45_v16i e45_castsi256_si512(__m256i a) { return {a, _mm256_setzero_si256()}; }  // (upper half: zeros)
E45_INLINE e45_v16f e45_castsi512_ps(e45_v16i a) { return {_mm256_castsi256_ps(a.lo), _mm256_castsi256_ps(a.hi)}; }
E45_INLINE e45_v16f e45_cvtepi32_ps(e45_v16i a) { return {_mm256_cvtepi32_ps(a.lo), _mm256_cvtepi32_ps(a.hi)}; }
E45_INLINE __mmask64 e45_movepi8_mask(e45_v16i a) {  // the bytes' sign bits
  return uint64_t(uint32_t(_mm256_movemask_epi8(a.lo))) | (uint64_t(uint32_t(_mm256_movemask_epi8(a.hi))) << 32);
}
E45_INLINE __m256i e45_bytes32(uint32_t bits) {  // byte i: 0xFF where bit i is set
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3,
                                          3, 3, 3, 3, 3, 3);
  const __m256i each = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
  const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)), spread);
  return _mm256_cmpeq_epi8(_mm256_and_si256(v, each), each);
}
E45_INLINE e45_v16i e45_mask_sub_epi8(e45_v16i src, __mmask64 k, e45_v16i a, e45_v16i b) {
  return {_mm256_blendv_epi8(src.lo, _mm256_sub_epi8(a.lo, b.lo), e45_bytes32(uint32_t(k))),
          _mm256_blendv_epi8(src.hi, _mm256_sub_epi8(a.hi, b.hi), e45_bytes32(uint32_t(k >> 32)))};
}
// src + the sums of four u8 x s8 products per 32-bit lane. vpdpbusd does not saturate; vpmaddubsw's pair sums do
// at +-32767, which the kernels' operands never reach (int8: |q|, |code| <= 127, so a pair <= 32258; int4: codes
// 0-15 against |q| <= 127).
E45_INLINE __m256i e45_dpbusd8(__m256i src, __m256i a, __m256i b) {
  return _mm256_add_epi32(src, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)));
}
E45_INLINE e45_v16i e45_dpbusd_epi32(e45_v16i src, e45_v16i a, e45_v16i b) {
  return {e45_dpbusd8(src.lo, a.lo, b.lo), e45_dpbusd8(src.hi, a.hi, b.hi)};
}
// ---- bf16
// acc + a[2i+1] * b[2i+1] + a[2i] * b[2i] per fp32 lane i, in that order (each product of two bf16 is exact in fp32)
E45_INLINE __m256 e45_dpbf16_8(__m256 acc, __m256i a, __m256i b) {
  const __m256i upper = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  acc = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(a, upper)),
                        _mm256_castsi256_ps(_mm256_and_si256(b, upper)), acc);
  return _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(a, 16)), _mm256_castsi256_ps(_mm256_slli_epi32(b, 16)),
                         acc);
}
E45_INLINE e45_v16f e45_dpbf16_ps(e45_v16f acc, e45_v32bh a, e45_v32bh b) {
  return {e45_dpbf16_8(acc.lo, a.lo, b.lo), e45_dpbf16_8(acc.hi, a.hi, b.hi)};
}
// 16 fp32 -> 16 bf16, rounded to nearest even (a NaN stays a quiet NaN)
E45_INLINE __m128i e45_bf16x8(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}
E45_INLINE __m256i e45_cvtneps_pbh(e45_v16f a) { return _mm256_set_m128i(e45_bf16x8(a.hi), e45_bf16x8(a.lo)); }

// the kernels' names for them
#define __m512 e45_v16f
#define __m512i e45_v16i
#define __m512bh e45_v32bh
#define _mm512_set1_ps e45_set1_ps
#define _mm512_setzero_ps e45_setzero_ps
#define _mm512_loadu_ps e45_loadu_ps
#define _mm512_load_ps e45_loadu_ps
#define _mm512_storeu_ps e45_storeu_ps
#define _mm512_store_ps e45_storeu_ps
#define _mm512_add_ps e45_add_ps
#define _mm512_sub_ps e45_sub_ps
#define _mm512_mul_ps e45_mul_ps
#define _mm512_div_ps e45_div_ps
#define _mm512_max_ps e45_max_ps
#define _mm512_fmadd_ps e45_fmadd_ps
#define _mm512_abs_ps e45_abs_ps
#define _mm512_reduce_add_ps e45_reduce_add_ps
#define _mm512_roundscale_ps(a, imm) e45_roundscale_ps<imm>(a)
#define _mm512_scalef_ps e45_scalef_ps
#define _mm512_cmp_ps_mask(a, b, imm) e45_cmp_ps_mask<imm>(a, b)
#define _mm512_mask_blend_ps e45_mask_blend_ps
#define _mm512_mask_div_ps e45_mask_div_ps
#define _mm512_maskz_mov_ps e45_maskz_mov_ps
#define _mm512_maskz_loadu_ps e45_maskz_loadu_ps
#define _mm512_mask_storeu_ps e45_mask_storeu_ps
#define _mm512_unpacklo_ps e45_unpacklo_ps
#define _mm512_unpackhi_ps e45_unpackhi_ps
#define _mm512_shuffle_ps(a, b, imm) e45_shuffle_ps<imm>(a, b)
#define _mm512_shuffle_f32x4(a, b, imm) e45_shuffle_f32x4<imm>(a, b)
#define _mm512_permutex2var_ps e45_permutex2var_ps
#define _mm512_loadu_si512 e45_loadu_si512
#define _mm512_load_si512 e45_loadu_si512
#define _mm512_storeu_si512 e45_storeu_si512
#define _mm512_setzero_si512 e45_setzero_si512
#define _mm512_set1_epi32 e45_set1_epi32
#define _mm512_set1_epi8 e45_set1_epi8
#define _mm512_set_epi32 e45_set_epi32
#define _mm512_and_si512 e45_and_si512
#define _mm512_srli_epi16 e45_srli_epi16
#define _mm512_slli_epi32 e45_slli_epi32
#define _mm512_abs_epi8 e45_abs_epi8
#define _mm512_cvtepu16_epi32 e45_cvtepu16_epi32
#define _mm512_castsi256_si512 e45_castsi256_si512
#define _mm512_castsi512_ps e45_castsi512_ps
#define _mm512_cvtepi32_ps e45_cvtepi32_ps
#define _mm512_movepi8_mask e45_movepi8_mask
#define _mm512_mask_sub_epi8 e45_mask_sub_epi8
#define _mm512_dpbusd_epi32 e45_dpbusd_epi32
#define _mm512_dpbf16_ps e45_dpbf16_ps
#define _mm512_cvtneps_pbh e45_cvtneps_pbh
