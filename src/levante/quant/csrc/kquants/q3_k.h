// Q3_K: 110-byte super-blocks of 256 weights, 16 groups of 16 with 6-bit signed scales.
//
// Bytes: 32 bytes hmask | 64 bytes qs (low 2 bits) | 12 bytes of scales | f16 d.
// Weight e = 128h + 32s + l (half h in 0..1, shift s in 0..3, l in 0..31) takes its low 2 bits
// from bits 2s, 2s + 1 of qs[32h + l] and its high bit from bit e / 32 (= 4h + s) of hmask[l];
// with q = low + 4 * high (0..7) it is d * (sc[e / 16] - 32) * (q - 4). Scale j (0..15) has its
// low 4 bits in the low (j < 8) or high (j >= 8) nibble of table byte j % 8 and bits 4-5 in
// bits 2(j / 4), 2(j / 4) + 1 of table byte 8 + j % 4.
// Example: table byte 0 = 0x21, byte 8 = 0b10 -> sc[0] = 0x1 | 0b10 << 4 = 33 (scale 1),
// sc[8] = 0x2 | 0 << 4 = 2 (scale -30); qs[0] = 0b11_10_01_00, hmask[0] = 0b10 -> weight 0
// has q = 0 (-4), weight 32 has q = 1 + 4 = 5 (+1).
// As `Unpacked`: q as above, scale = sc - 32 (-32..31), dm = d and min = 4 * scale.
#pragma once

#include "kquant.h"

namespace levante::kquant {

struct Q3K {
  static constexpr int64_t kTypeId = 11;  // GGMLQuantizationType.Q3_K
  static constexpr int kBlockBytes = 110;
  static constexpr bool kScalePer32 = false;
  static constexpr const char* kName = "Q3_K";

  static void unpack(const uint8_t* block, Unpacked& out) {
    unpack_q(block, block + 32, out.q);
    unpack_scales(block + 96, out);
    out.d = load_half(block + 108);
    out.dm = out.d;
  }

  // The 12-byte table -> scale = sc - 32 and min = 4 * scale, each written as one 32-byte
  // vector (a load spanning smaller stores, such as 4 words then 16 bytes, stalls).
  static void unpack_scales(const uint8_t* table, Unpacked& out) {
    // The table as 3 little-endian words; word w of sc holds sc 4w..4w+3, one per byte.
    uint32_t t[3];
    std::memcpy(t, table, sizeof(t));
    const uint32_t low = 0x0F0F0F0F, top = 0x03030303;
    const uint32_t sc[4] = {(t[0] & low) | ((t[2] & top) << 4),
                            (t[1] & low) | (((t[2] >> 2) & top) << 4),
                            ((t[0] >> 4) & low) | (((t[2] >> 4) & top) << 4),
                            ((t[1] >> 4) & low) | (((t[2] >> 6) & top) << 4)};
#if defined(__AVX2__)
    const __m128i bytes = _mm_sub_epi8(
        _mm_setr_epi32(static_cast<int>(sc[0]), static_cast<int>(sc[1]), static_cast<int>(sc[2]),
                       static_cast<int>(sc[3])),
        _mm_set1_epi8(32));
    const __m256i scale = _mm256_cvtepi8_epi16(bytes);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.scale), scale);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.min), _mm256_slli_epi16(scale, 2));
#else
    uint8_t bytes[16];
    std::memcpy(bytes, sc, sizeof(bytes));
    for (int j = 0; j < kGroups; ++j) out.scale[j] = static_cast<int16_t>(bytes[j] - 32);
    for (int j = 0; j < kGroups; ++j) out.min[j] = static_cast<int16_t>(4 * (bytes[j] - 32));
#endif
  }

  // q[128h + 32s + l] = bits 2s, 2s + 1 of qs[32h + l] | bit 4h + s of hmask[l] as bit 2.
  static void unpack_q(const uint8_t* hmask, const uint8_t* qs, uint8_t* q) {
#if defined(__AVX2__)
    // Compilers turn the plain loops into byte-wise shifts and masks at ~2x the instructions
    // (Q3_K decode was 1.4x Q4_K's time per super-block). 16-bit shifts are fine here: each
    // result byte keeps only bits that came from the same byte.
    const __m256i hm = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hmask));
    const __m256i two_bits = _mm256_set1_epi8(0x03), bit2 = _mm256_set1_epi8(0x04);
    for (int h = 0; h < 2; ++h) {
      const __m256i low = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * h));
      // hmask bit 4h + s moved to bit 2: left by 2 - (4h + s) or right by 4h + s - 2.
      const __m256i high[4] = {h ? _mm256_srli_epi16(hm, 2) : _mm256_slli_epi16(hm, 2),
                               h ? _mm256_srli_epi16(hm, 3) : _mm256_slli_epi16(hm, 1),
                               h ? _mm256_srli_epi16(hm, 4) : hm,
                               h ? _mm256_srli_epi16(hm, 5) : _mm256_srli_epi16(hm, 1)};
      for (int s = 0; s < 4; ++s) {
        const __m256i v =
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(low, 2 * s), two_bits),
                            _mm256_and_si256(high[s], bit2));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 128 * h + 32 * s), v);
      }
    }
#else
    for (int h = 0; h < 2; ++h) {
      for (int s = 0; s < 4; ++s) {
        const int bit = 4 * h + s;
        uint8_t* chunk = q + 128 * h + 32 * s;
        for (int l = 0; l < 32; ++l)
          chunk[l] = ((qs[32 * h + l] >> (2 * s)) & 0x03) | (((hmask[l] >> bit) & 1) << 2);
      }
    }
#endif
  }
};

}  // namespace levante::kquant
