// GGUF K-quant types for the k_gemm.cpp kernels: what a type provides, in one place.
//
// A K-quant tensor row is K / 256 super-blocks of 256 weights, each stored in the type's
// own bytes (Q4_K: 144, Q6_K: 210, ...). The kernels never read those bytes themselves: a
// type's `unpack` turns one super-block into the `Unpacked` form below, the same for every
// type, and all the arithmetic (decode, prefill, the portable loops) works on that form:
//
//   weight e (0..255) = d * scale[e / 16] * q[e]  -  dm * min[e / 16]
//
// with q unsigned. Every K-quant fits it: Q4_K / Q5_K are (d * sc) * q - (dmin * m) with
// one sc / m per 32 weights (written twice, once per group of 16); Q6_K is d * sc * (q - 32),
// so dm = d and min = 32 * sc; Q3_K is d * (sc - 32) * (q - 4) with q = low 2 bits + 4 * high
// bit, so scale = sc - 32, dm = d, min = 4 * scale; Q2_K has d, dmin and 4-bit sc, m.
//
// Against activations quantized per super-block as Q8_K (x ~ dx * xq, xq int8 in
// [-127, 127], bsum[g] = sum of xq over group g of 16), a super-block contributes
//   dx * (d * sum_g scale[g] * sum_{e in g} q[e] * xq[e]  -  dm * sum_g min[g] * bsum[g])
// in which both sums are exact integers. The kernels need these bounds, which keep every
// intermediate inside int16 / int32 (maddubs pairs: 2 * 127 * 127 < 2^15):
//   0 <= q[e] <= 127,  |scale[g]| <= 128,  |min[g]| <= 8192.
//
// Adding a type (Q5_K, Q3_K, ...) takes one header here and one registry line:
//   1. kquants/<type>.h with a struct like `Q4K` (copy q4_k.h or q6_k.h) holding
//        kTypeId      the ggml type id (gguf.GGMLQuantizationType.Q5_K = 13, Q3_K = 11)
//        kBlockBytes  bytes per super-block (gguf.GGML_QUANT_SIZES[type][1]: 176, 110)
//        kScalePer32  true if scale[2j] == scale[2j + 1] always (one scale per 32 weights):
//                     the prefill kernel then applies scales half as often
//        kName        "Q5_K", for error messages
//        static void unpack(const uint8_t* block, Unpacked& out);
//      which fills every field of `out` from one super-block's bytes: a pure function in
//      plain C++, which compilers vectorize (AVX2 here, SSE2 in the portable x86 build, NEON).
//      Where their code is slow (Q3_K's and Q5_K's bit gathering took ~2x the instructions),
//      put an `#if defined(__AVX2__)` version beside the plain loops, as q3_k.h / q5_k.h do;
//      the portable build's test then checks the plain one.
//      Mind one thing for speed: the kernels read q 32 bytes at a time and scale / min as one
//      32-byte vector each, and a load that spans several smaller stores cannot be forwarded
//      from them (it waits for them to reach the cache: it made Q4_K decode 3x slower). So
//      write each 32 bytes of q with one loop over 32 values, and scale / min with one call
//      of a helper below (spread_pairs, widen_signed), not element by element.
//   2. `#include` it in k_gemm.cpp and add `X(Q5K)` to LQ_KQUANT_TYPES there.
//   3. Add the GGMLQuantizationType to KQUANT_TYPES in levante/quant/kernels.py and to
//      TYPES (and its f16 fields to F16_FIELDS) in tests/quant/test_kquant_kernels.py: its
//      tests then cover the new type (dequantization against gguf-py, the kernel against a
//      float64 reference at M = 1..300, the portable build). The Python fallback and the
//      tests dequantize through levante.quant.gguf_blocks, which must know the type too.
// Then compare `benchmarks/kernels.py --kquant` figures with Q4_K's.
#pragma once

#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace levante::kquant {

constexpr int kSuperBlock = 256;  // weights per super-block (ggml's QK_K)
constexpr int kGroup = 16;        // weights per scale / min entry
constexpr int kGroups = kSuperBlock / kGroup;

// One super-block, decoded: weight e = d * scale[e / 16] * q[e] - dm * min[e / 16].
struct alignas(32) Unpacked {
  uint8_t q[kSuperBlock];  // 0..127, in the weights' order
  int16_t scale[kGroups];  // |scale| <= 128
  int16_t min[kGroups];    // |min| <= 8192
  float d;
  float dm;
};

// Little-endian IEEE half at p (any alignment) -> float.
inline float load_half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof(h));
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return c10::detail::fp16_ieee_to_fp32_value(h);
#endif
}

// out[2i] = out[2i + 1] = in[i] for i < 8: one byte per 32 weights -> one int16 per group of
// 16 (Q4_K / Q5_K scales and mins). Compilers turn the plain loop into byte extracts; with
// AVX2 the kernels read out[] back as one 32-byte vector, so it is written as one (a load
// spanning two smaller stores stalls).
inline void spread_pairs(const uint8_t* in, int16_t* out) {
#if defined(__AVX2__)
  const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(in));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                      _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(v, v)));
#else
  for (int i = 0; i < 16; ++i) out[i] = in[i / 2];
#endif
}

// out[i] = multiplier * (int8) in[i] for i < 16: signed 8-bit scales per group of 16 (Q6_K),
// optionally times the type's offset (Q6_K's min = 32 * scale). One 32-byte store with AVX2.
inline void widen_signed(const uint8_t* in, int16_t multiplier, int16_t* out) {
#if defined(__AVX2__)
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                      _mm256_mullo_epi16(_mm256_cvtepi8_epi16(v), _mm256_set1_epi16(multiplier)));
#else
  for (int i = 0; i < 16; ++i)
    out[i] = static_cast<int16_t>(multiplier * static_cast<int8_t>(in[i]));
#endif
}

}  // namespace levante::kquant
