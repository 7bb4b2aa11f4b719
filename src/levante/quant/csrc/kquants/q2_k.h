// Q2_K: 84-byte super-blocks of 256 weights, 16 groups of 16 with 4-bit scales and mins.
//
// Bytes: 16 bytes of scales (low nibble sc, high nibble m, one byte per group) | 64 bytes qs |
// f16 d | f16 dmin. Weight e = 128h + 32s + l (half h in 0..1, shift s in 0..3, l in 0..31)
// is q = bits 2s, 2s + 1 of qs[32h + l] (0..3), and (d * sc[e / 16]) * q - (dmin * m[e / 16]).
// Example: scales[0] = 0x21, d = 1.0, dmin = 0.5, qs[0] = 0b11_10_01_00 -> weight 0 is
// 1 * 0 - 0.5 * 2 = -1.0; weight 32 (shift 1, group 2) has q = 1.
#pragma once

#include "kquant.h"

namespace levante::kquant {

struct Q2K {
  static constexpr int64_t kTypeId = 10;  // GGMLQuantizationType.Q2_K
  static constexpr int kBlockBytes = 84;
  static constexpr bool kScalePer32 = false;
  static constexpr const char* kName = "Q2_K";

  static void unpack(const uint8_t* block, Unpacked& out) {
    const uint8_t* qs = block + 16;
    for (int h = 0; h < 2; ++h) {
      for (int s = 0; s < 4; ++s) {
        uint8_t* q = out.q + 128 * h + 32 * s;
        for (int l = 0; l < 32; ++l) q[l] = (qs[32 * h + l] >> (2 * s)) & 0x03;
      }
    }
    // scale / min: the low / high nibbles of bytes 0-15, each written as one 32-byte store.
#if defined(__AVX2__)
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block));
    const __m128i nibble = _mm_set1_epi8(0x0F);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.scale),
                        _mm256_cvtepu8_epi16(_mm_and_si128(v, nibble)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.min),
                        _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), nibble)));
#else
    for (int g = 0; g < kGroups; ++g) out.scale[g] = block[g] & 0x0F;
    for (int g = 0; g < kGroups; ++g) out.min[g] = block[g] >> 4;
#endif
    out.d = load_half(block + 80);
    out.dm = load_half(block + 82);
  }
};

}  // namespace levante::kquant
