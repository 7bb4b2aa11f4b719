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
    const uint8_t* ql = block;
    const uint8_t* qh = block + 128;
    for (int h = 0; h < 2; ++h) {
      for (int t = 0; t < 4; ++t) {
        const uint8_t* low = ql + 64 * h + 32 * (t % 2);
        const int low_shift = 4 * (t / 2), high_shift = 2 * t;
        uint8_t* q = out.q + 128 * h + 32 * t;
        for (int l = 0; l < 32; ++l)
          q[l] = ((low[l] >> low_shift) & 0x0F) | (((qh[32 * h + l] >> high_shift) & 0x03) << 4);
      }
    }
    widen_signed(block + 192, 1, out.scale);
    widen_signed(block + 192, 32, out.min);
    out.d = load_half(block + 208);
    out.dm = out.d;
  }
};

}  // namespace levante::kquant
