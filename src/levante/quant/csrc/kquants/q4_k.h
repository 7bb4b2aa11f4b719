// Q4_K: 144-byte super-blocks of 256 weights, 8 sub-blocks of 32 with 6-bit scales and mins.
//
// Bytes: f16 d | f16 dmin | 12 bytes of scales/mins | 128 bytes of 4-bit q.
// Sub-block j's weights are (d * sc[j]) * q - (dmin * m[j]). The 12-byte table holds sc[0..3]
// and m[0..3] in the low 6 bits of bytes 0-3 and 4-7; sc[4..7] / m[4..7] keep their low 4 bits
// in the low / high nibbles of bytes 8-11 and their top 2 bits in the top 2 bits of bytes
// 0-3 / 4-7. The quants are 4 chunks of 32 bytes: chunk c's low nibbles are sub-block 2c,
// its high nibbles sub-block 2c + 1.
// Example: table byte 0 = 0x45 (0b01_000101), byte 8 = 0x23 -> sc[0] = 5,
// sc[4] = 0x3 | 0b01 << 4 = 19, m[4] = 0x2 | (top 2 bits of byte 4) << 4.
#pragma once

#include "kquant.h"

namespace levante::kquant {

struct Q4K {
  static constexpr int64_t kTypeId = 12;  // GGMLQuantizationType.Q4_K
  static constexpr int kBlockBytes = 144;
  static constexpr bool kScalePer32 = true;
  static constexpr const char* kName = "Q4_K";

  static void unpack(const uint8_t* block, Unpacked& out) {
    out.d = load_half(block);
    out.dm = load_half(block + 2);
    unpack_scales_mins(block + 4, out);
    const uint8_t* qs = block + 16;
    for (int c = 0; c < 4; ++c) {
      for (int i = 0; i < 32; ++i) {
        out.q[64 * c + i] = qs[32 * c + i] & 0x0F;
        out.q[64 * c + 32 + i] = qs[32 * c + i] >> 4;
      }
    }
  }

  // The 12-byte table at `table` -> out.scale / out.min (also Q5_K's).
  static void unpack_scales_mins(const uint8_t* table, Unpacked& out) {
    // The table as 3 little-endian words; each byte of sc_mn is one 6-bit scale or min.
    uint32_t t[3];
    std::memcpy(t, table, sizeof(t));
    const uint32_t sc_mn[4] = {t[0] & 0x3F3F3F3F,                                   // sc 0-3
                               (t[2] & 0x0F0F0F0F) | ((t[0] >> 2) & 0x30303030),   // sc 4-7
                               t[1] & 0x3F3F3F3F,                                   // m 0-3
                               ((t[2] >> 4) & 0x0F0F0F0F) | ((t[1] >> 2) & 0x30303030)};
    uint8_t bytes[16];
    std::memcpy(bytes, sc_mn, sizeof(bytes));
    spread_pairs(bytes, out.scale);  // sub-block j of 32 = groups 2j, 2j + 1
    spread_pairs(bytes + 8, out.min);
  }
};

}  // namespace levante::kquant
