// SIMD shared by q_gemm.cpp and k_gemm.cpp: which instruction sets the build targets, the
// integer dot products both kernels use, and `Lanes<W>`, the vector operations their panel
// kernels are written over: W = 8 int32 / float lanes (256-bit, AVX2) or W = 16 (512-bit,
// AVX-512 with VNNI; this dev box's AMD EPYC runs a 512-bit dpbusd at the 256-bit rate, so
// twice the multiply-adds per instruction), lane r belonging to weight row r.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LQ_AVX2 1
#include <immintrin.h>
#if defined(__AVXVNNI__)
#define LQ_VNNI 1
#define LQ_DPBUSD(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#define LQ_DPWSSD(acc, a, b) _mm256_dpwssd_avx_epi32(acc, a, b)
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define LQ_VNNI 1
#define LQ_DPBUSD(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#define LQ_DPWSSD(acc, a, b) _mm256_dpwssd_epi32(acc, a, b)
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(LQ_VNNI)
#define LQ_AVX512 1
#endif
#endif

namespace levante::simd {

inline int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

#ifdef LQ_AVX2
inline int hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
  return _mm_cvtsi128_si32(s);
}

// acc + sum of u[j] * s[j] over each 4 bytes, u unsigned, s signed: exact where pairs of
// products fit int16 without VNNI (|u| <= 128, |s| <= 127), always with it.
inline __m256i dot_quads(__m256i acc, __m256i u, __m256i s) {
#ifdef LQ_VNNI
  return LQ_DPBUSD(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s),
                                                 _mm256_set1_epi16(1)));
#endif
}

// acc + sum of a[j] * b[j] over each 2 int16.
inline __m256i dot_pairs(__m256i acc, __m256i a, __m256i b) {
#ifdef LQ_VNNI
  return LQ_DPWSSD(acc, a, b);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}

template <int W>
struct Lanes;

template <>
struct Lanes<8> {
  using I = __m256i;
  using F = __m256;
  static constexpr int kRows = 8;
  static I zero() { return _mm256_setzero_si256(); }
  static I load(const void* p) { return _mm256_load_si256(static_cast<const __m256i*>(p)); }
  static I bytes(char v) { return _mm256_set1_epi8(v); }
  static I broadcast(int32_t v) { return _mm256_set1_epi32(v); }
  static I and_(I a, I b) { return _mm256_and_si256(a, b); }
  static I xor_(I a, I b) { return _mm256_xor_si256(a, b); }
  static I srli16(I a, int n) { return _mm256_srli_epi16(a, n); }
  static I add(I a, I b) { return _mm256_add_epi32(a, b); }
  static I sub(I a, I b) { return _mm256_sub_epi32(a, b); }
  static I mullo(I a, I b) { return _mm256_mullo_epi32(a, b); }
  static I sign(I a, I b) { return _mm256_sign_epi8(a, b); }
  static I quads(I acc, I u, I s) { return dot_quads(acc, u, s); }
  static I pairs(I acc, I a, I b) { return dot_pairs(acc, a, b); }
  static F zero_f() { return _mm256_setzero_ps(); }
  static F load_f(const float* p) { return _mm256_loadu_ps(p); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F to_float(I v) { return _mm256_cvtepi32_ps(v); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  // The first `rows` floats at src (the rest 0) / of v to dst.
  static F load_rows(const float* src, int rows) {
    if (rows == kRows) return _mm256_loadu_ps(src);
    alignas(32) float lanes[kRows] = {};
    for (int r = 0; r < rows; ++r) lanes[r] = src[r];
    return _mm256_load_ps(lanes);
  }
  static void store_rows(float* dst, F v, int rows) {
    if (rows == kRows) return _mm256_storeu_ps(dst, v);
    alignas(32) float lanes[kRows];
    _mm256_store_ps(lanes, v);
    for (int r = 0; r < rows; ++r) dst[r] = lanes[r];
  }
};

#ifdef LQ_AVX512
template <>
struct Lanes<16> {
  using I = __m512i;
  using F = __m512;
  static constexpr int kRows = 16;
  static I zero() { return _mm512_setzero_si512(); }
  static I load(const void* p) { return _mm512_load_si512(p); }
  static I bytes(char v) { return _mm512_set1_epi8(v); }
  static I broadcast(int32_t v) { return _mm512_set1_epi32(v); }
  static I and_(I a, I b) { return _mm512_and_si512(a, b); }
  static I xor_(I a, I b) { return _mm512_xor_si512(a, b); }
  static I srli16(I a, int n) { return _mm512_srli_epi16(a, n); }
  static I add(I a, I b) { return _mm512_add_epi32(a, b); }
  static I sub(I a, I b) { return _mm512_sub_epi32(a, b); }
  static I mullo(I a, I b) { return _mm512_mullo_epi32(a, b); }
  static I quads(I acc, I u, I s) { return _mm512_dpbusd_epi32(acc, u, s); }
  static I pairs(I acc, I a, I b) { return _mm512_dpwssd_epi32(acc, a, b); }
  static F zero_f() { return _mm512_setzero_ps(); }
  static F load_f(const float* p) { return _mm512_loadu_ps(p); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F to_float(I v) { return _mm512_cvtepi32_ps(v); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  static F load_rows(const float* src, int rows) {
    return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << rows) - 1), src);
  }
  static void store_rows(float* dst, F v, int rows) {
    _mm512_mask_storeu_ps(dst, static_cast<__mmask16>((1u << rows) - 1), v);
  }
};
#endif
#endif

}  // namespace levante::simd
