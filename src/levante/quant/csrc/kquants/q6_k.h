// Q6_K: 210-byte super-blocks of 256 weights, 16 groups of 16 with signed 8-bit scales.
//
// Bytes: 128 bytes ql (low 4 bits) | 64 bytes qh (high 2 bits) | 16 int8 scales | f16 d.
// Weight e = 128h + 32t + l (half h in 0..1, t in 0..3, l in 0..31) is
// d * scales[e / 16] * (q - 32), q = 0..63 taking its low 4 bits from ql[64h + 32(t % 2) + l]
// (the low nibble if t < 2, else the high one) and its high 2 bits from bits 2t, 2t + 1 of
// qh[32h + l]. Example: ql[0] = 0x5A, qh[0] = 0b00_00_01_10, scales[0] = 2, d = 1.0 -> weight
// 0 is q = 0xA | 0b10 << 4 = 42 -> 2 * (42 - 32) = 20.0; weight 32 has high bits 0b01.
// As `Unpacked`: q as is, scale = scales, and the -32 as min = 32 * scale with dm = d.
#pragma once

#include "kquant.h"

namespace levante::kquant {

struct Q6K {
  static constexpr int64_t kTypeId = 14;  // GGMLQuantizationType.Q6_K
  static constexpr int kBlockBytes = 210;
  static constexpr bool kScalePer32 = false;
  static constexpr const char* kName = "Q6_K";

  static void unpack(const uint8_t* block, Unpacked& out) {
    unpack_q(block, block + 128, out.q);
    widen_signed(block + 192, 1, out.scale);
    widen_signed(block + 192, 32, out.min);
    out.d = load_half(block + 208);
    out.dm = out.d;
  }

  // q[128h + 32t + l] = nibble t / 2 of ql[64h + 32(t % 2) + l] | bits 2t, 2t + 1 of
  // qh[32h + l] as bits 4-5.
  static void unpack_q(const uint8_t* ql, const uint8_t* qh, uint8_t* q) {
#if defined(__AVX2__)
    // The plain loops compile to byte-wise shifts at ~2x the instructions, and Q6_K is the
    // output head of every Q4_K_M / Q3_K_M file (a third of Mistral's decode bytes). 16-bit
    // shifts are fine: each result byte keeps only bits that came from the same byte.
    const __m256i nibble = _mm256_set1_epi8(0x0F), bits45 = _mm256_set1_epi8(0x30);
    for (int h = 0; h < 2; ++h) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 64 * h));
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 64 * h + 32));
      const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh + 32 * h));
      const __m256i low[4] = {_mm256_and_si256(a, nibble), _mm256_and_si256(b, nibble),
                              _mm256_and_si256(_mm256_srli_epi16(a, 4), nibble),
                              _mm256_and_si256(_mm256_srli_epi16(b, 4), nibble)};
      // bits 2t, 2t + 1 moved to 4, 5: left by 4 - 2t, or right by 2 for t = 3
      const __m256i high[4] = {_mm256_slli_epi16(hi, 4), _mm256_slli_epi16(hi, 2), hi,
                               _mm256_srli_epi16(hi, 2)};
      for (int t = 0; t < 4; ++t)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 128 * h + 32 * t),
                            _mm256_or_si256(low[t], _mm256_and_si256(high[t], bits45)));
    }
#else
    for (int h = 0; h < 2; ++h) {
      for (int t = 0; t < 4; ++t) {
        const uint8_t* low = ql + 64 * h + 32 * (t % 2);
        const int low_shift = 4 * (t / 2), high_shift = 2 * t;
        uint8_t* out_q = q + 128 * h + 32 * t;
        for (int l = 0; l < 32; ++l)
          out_q[l] = ((low[l] >> low_shift) & 0x0F) | (((qh[32 * h + l] >> high_shift) & 0x03) << 4);
      }
    }
#endif
  }
};

}  // namespace levante::kquant
