// Q5_K: 176-byte super-blocks of 256 weights; Q4_K with a fifth bit per weight.
//
// Bytes: f16 d | f16 dmin | 12 bytes of scales/mins (Q4_K's table) | 32 bytes qh |
// 128 bytes of low nibbles (Q4_K's order: chunk c's low nibbles are sub-block 2c, its high
// nibbles sub-block 2c + 1). Bit j of qh[l] is bit 4 of weight l of sub-block j, so
// q = 0..31 and weight = (d * sc[j]) * q - (dmin * m[j]) as in Q4_K.
// Example: qh[0] = 0b0000_0010, qs[0] = 0x7B -> weight 0 of sub-block 0 has q = 0xB, weight 0
// of sub-block 1 (weight 32) has q = 0x7 | 0x10 = 23.
#pragma once

#include "kquant.h"
#include "q4_k.h"

namespace levante::kquant {

struct Q5K {
  static constexpr int64_t kTypeId = 13;  // GGMLQuantizationType.Q5_K
  static constexpr int kBlockBytes = 176;
  static constexpr bool kScalePer32 = true;
  static constexpr const char* kName = "Q5_K";

  static void unpack(const uint8_t* block, Unpacked& out) {
    out.d = load_half(block);
    out.dm = load_half(block + 2);
    Q4K::unpack_scales_mins(block + 4, out);
    unpack_q(block + 16, block + 48, out.q);
  }

  // q[64c + i] = low nibble of qs[32c + i] | bit 2c of qh[i] as bit 4; q[64c + 32 + i] = the
  // high nibble | bit 2c + 1.
  static void unpack_q(const uint8_t* qh, const uint8_t* qs, uint8_t* q) {
#if defined(__AVX2__)
    // The plain loops compile to ~2x the instructions (Q5_K unpacked at 2.7x Q4_K's time).
    // 16-bit shifts are fine: each result byte keeps only bits from the same byte.
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh));
    const __m256i nibble = _mm256_set1_epi8(0x0F), bit4 = _mm256_set1_epi8(0x10);
    // qh bit j moved to bit 4: left by 4 - j or right by j - 4.
    const __m256i fifth[8] = {_mm256_slli_epi16(h, 4), _mm256_slli_epi16(h, 3),
                              _mm256_slli_epi16(h, 2), _mm256_slli_epi16(h, 1), h,
                              _mm256_srli_epi16(h, 1), _mm256_srli_epi16(h, 2),
                              _mm256_srli_epi16(h, 3)};
    for (int c = 0; c < 4; ++c) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * c));
      const __m256i lo = _mm256_or_si256(_mm256_and_si256(v, nibble),
                                         _mm256_and_si256(fifth[2 * c], bit4));
      const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), nibble),
                                         _mm256_and_si256(fifth[2 * c + 1], bit4));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 64 * c), lo);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 64 * c + 32), hi);
    }
#else
    for (int c = 0; c < 4; ++c) {
      for (int i = 0; i < 32; ++i)
        q[64 * c + i] = (qs[32 * c + i] & 0x0F) | (((qh[i] >> (2 * c)) & 1) << 4);
      for (int i = 0; i < 32; ++i)
        q[64 * c + 32 + i] = (qs[32 * c + i] >> 4) | (((qh[i] >> (2 * c + 1)) & 1) << 4);
    }
#endif
  }
};

}  // namespace levante::kquant
