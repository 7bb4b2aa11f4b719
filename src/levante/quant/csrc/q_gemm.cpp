// Quantized GEMM for GGUF Q8_0 / Q4_0 / Q4_1 weights on CPU: y[M, N] = x[M, K] @ W[N, K]^T.
//
// As llama.cpp does it: each row of x is quantized to 8 bits in blocks of 32 (one float
// scale dx per block, and the block's sum), then every (weight block, activation block) pair
// is an exact integer dot product of 32 byte pairs, scaled once in float.
//
// Weight layout (made by levante.quant.kernels.repack from the GGUF blocks, lossless): rows
// in panels of 8, interleaved 4 bytes at a time, so that one 32-byte load holds 4 weights
// of each of 8 rows (the idea of ik_llama.cpp's row-interleaved _R8 types):
//   qs [N, nb * QB] uint8 (QB = 32 for Q8_0, 16 for Q4; nb = K / 32): panel p, rows
//     8p .. 8p + R - 1 (R = 8, or N % 8 for the last), fills those rows' bytes with, for
//     each block b, each step t < QB / 4, each row r < R: 4 bytes of row r's block b, its
//     quant bytes 4t .. 4t + 3 as in the file. Q8_0: int8 values 4t .. 4t + 3. Q4: the file
//     packs value j in byte j's low nibble and value j + 16 in its high nibble, so a step
//     holds values 4t .. 4t + 3 (low) and 16 + 4t .. 16 + 4t + 3 (high).
//   d  [N, nb] f16: per-block scale, panel by panel the same way: block b's R scales in turn.
//   m  [N, nb] f16: Q4_1's per-block min, laid out as d.
// A panel's bytes are its rows' bytes, so whole panels slice and stack like rows.
//
// One VNNI dpbusd then multiplies 4 weights of each of the 8 rows by the same 4 activation
// bytes (a broadcast load) into 8 int32 lanes, lane r for row r: no horizontal sums, and a
// panel block's float scales apply with one FMA for 8 outputs. Decode streams each thread's
// panels in memory order; prefill sweeps each panel span (in L1) with up to 256 activation
// rows (in L2), 8 at a time with AVX-512's registers. Per block b of weight row n and
// activation row i (isum = the exact integer dot of the block's weight values with xq):
//   Q8_0, Q4_0: out = fma(isum, d[n,b] * dx[i,b], out)     (Q4_0's values are q - 8)
//   Q4_1:       the same, then out = fma(m[n,b], dx[i,b] * sum(xq), out)
// block after block, for every M alike, so a row's output is the same bits whatever batch
// it is in (issue 18).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "simd.h"

namespace {

using namespace levante::simd;  // NOLINT: the kernels' SIMD vocabulary

// ggml's type ids (gguf.GGMLQuantizationType).
constexpr int64_t kQ4_0 = 2;
constexpr int64_t kQ4_1 = 3;
constexpr int64_t kQ8_0 = 8;
constexpr int64_t kBlock = 32;
constexpr int kPanelRows = 8;  // weight rows interleaved per panel in qs

template <int64_t QT>
constexpr int quant_bytes() { return QT == kQ8_0 ? 32 : 16; }

struct Weights {
  const uint8_t* qs;
  const uint16_t* d;
  const uint16_t* m;  // Q4_1 only
  int64_t n, nb;
};

// One panel's arrays, 8 rows wide (a last panel of fewer rows is copied out zero-padded).
struct Panel {
  const uint8_t* q;   // block b, step t: 8 rows x 4 bytes at q + (b * steps + t) * 32
  const uint16_t* d;  // block b: 8 rows' f16 scales at d + 8 b
  const uint16_t* m;  // Q4_1: as d
};

struct Acts {
  const int8_t* q;     // [M, K]
  const float* d;      // [M, nb]
  const float* s;      // [M, nb]: d * sum(q) per block (Q4_1's min term)
  const int32_t* sum;  // [M, nb]: sum(q) per block (the Q8_0 / Q4_0 offsets)
  int64_t k, nb;
};

inline float f16_to_f32(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }

#ifdef LQ_AVX2
inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// One row of x -> 8-bit blocks, llama.cpp's Q8 rule: d = amax / 127, q = round(x * 127 / amax)
// (ties to even), sum = sum(q), s = d * sum.
void quantize_row(const float* x, int64_t nb, int8_t* q, float* d, float* s, int32_t* sums) {
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * kBlock;
    int8_t* qb = q + b * kBlock;
#ifdef LQ_AVX2
    __m256 v[4];
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 mx = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(xb + 8 * i);
      mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[i]));
    }
    const float amax = hmax(mx);
#else
    float amax = 0.0f;
    for (int64_t j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(xb[j]));
#endif
    const float inv = amax != 0.0f ? 127.0f / amax : 0.0f;
    d[b] = amax / 127.0f;
#ifdef LQ_AVX2
    __m256i iv[4];
    for (int i = 0; i < 4; ++i) {
      const __m256 r = _mm256_round_ps(_mm256_mul_ps(v[i], _mm256_set1_ps(inv)),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      iv[i] = _mm256_cvtps_epi32(r);
    }
    const int sum = hsum_i32(_mm256_add_epi32(_mm256_add_epi32(iv[0], iv[1]),
                                              _mm256_add_epi32(iv[2], iv[3])));
    // packs work per 128-bit lane: undo the lane interleave with a permute.
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(iv[0], iv[1]),
                                         _mm256_packs_epi32(iv[2], iv[3]));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb), _mm256_permutevar8x32_epi32(p, order));
#else
    int sum = 0;
    for (int64_t j = 0; j < kBlock; ++j) {
      const int qi = static_cast<int>(std::nearbyint(xb[j] * inv));
      qb[j] = static_cast<int8_t>(qi);
      sum += qi;
    }
#endif
    sums[b] = sum;
    s[b] = d[b] * static_cast<float>(sum);
  }
}

// The offset a block's integer dot takes from the activations' sum: Q8_0's weights are
// signed and VNNI multiplies unsigned by signed bytes, so it runs on w + 128 and takes
// 128 * sum(xq) back; Q4_0's weights are q - 8 with q unsigned.
template <int64_t QT>
constexpr int32_t sum_offset() {
#ifdef LQ_VNNI
  if constexpr (QT == kQ8_0) return 128;
#endif
  return QT == kQ4_0 ? 8 : 0;
}

#ifdef LQ_AVX2
constexpr int64_t kPrefetch = 2048;  // bytes of the weight stream requested ahead of use

// The weight rows one kernel call covers and the vector operations on them, lane r for row
// r: one panel (8 lanes, 256-bit), or with AVX-512 two adjacent panels (16 lanes, 512-bit:
// this machine's AMD EPYC runs a 512-bit dpbusd at the 256-bit rate). `quants(off)` is the
// 32-byte unit at byte `off` of each panel's block stream, `halves(&Panel::d, b)` block b's
// f16 scales (or mins) of the rows as floats.
struct OnePanel : Lanes<kPanelRows> {
  Panel p;

  explicit OnePanel(const Panel& panel) : p(panel) {}

  I quants(int64_t off) const {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.q + off));
  }
  F halves(const uint16_t* Panel::*field, int64_t b) const {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.*field + 8 * b)));
  }
  void prefetch(int64_t off) const {
    _mm_prefetch(reinterpret_cast<const char*>(p.q + off), _MM_HINT_T0);
  }
};

#ifdef LQ_AVX512
struct TwoPanels : Lanes<2 * kPanelRows> {
  Panel p, q;  // rows n0 .. n0 + 7 and n0 + 8 .. n0 + 15

  TwoPanels(const Panel& first, const Panel& second) : p(first), q(second) {}

  I quants(int64_t off) const {
    return _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.q + off))),
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q.q + off)), 1);
  }
  F halves(const uint16_t* Panel::*field, int64_t b) const {
    const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p.*field + 8 * b));
    const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q.*field + 8 * b));
    return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1));
  }
  void prefetch(int64_t off) const {
    _mm_prefetch(reinterpret_cast<const char*>(p.q + off), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(q.q + off), _MM_HINT_T0);
  }
};
#endif

// out[c] lane r, for the unit's row r and activation row m0 + c, continued over blocks
// [b0, b1): per block, the exact integer dot isum, then out = fma(isum, d_w * d_x, out)
// (Q4_1: then out = fma(m_w, s_x, out)). The same operations in the same order for any M
// and either unit (decode, prefill, any span): a row's output does not depend on the batch
// (issue 18).
template <int64_t QT, int RX, class U>
inline void panel_blocks(const U& u, const Acts& a, int64_t m0, int64_t b0, int64_t b1,
                         typename U::F out[RX]) {
  using I = typename U::I;
  constexpr int kBlockBytes = kPanelRows * quant_bytes<QT>();
  // Few activation rows leave one dependent chain of 8 dot steps per block: split it.
  constexpr int kChains = RX <= 2 ? 2 : 1;
  const I low4 = U::bytes(0x0F);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t block = b * kBlockBytes;
    for (int off = 0; off < kBlockBytes; off += 64) u.prefetch(block + kPrefetch + off);
    I acc[kChains][RX];
    for (int h = 0; h < kChains; ++h)
      for (int c = 0; c < RX; ++c) acc[h][c] = U::zero();
    const int8_t* x = a.q + m0 * a.k + b * kBlock;
    if constexpr (QT == kQ8_0) {
#pragma GCC unroll 8
      for (int t = 0; t < 8; ++t) {
        const I w = u.quants(block + 32 * t);
#ifdef LQ_VNNI
        const I wu = U::xor_(w, U::bytes(static_cast<char>(0x80)));
        for (int c = 0; c < RX; ++c)
          acc[t % kChains][c] = U::quads(acc[t % kChains][c], wu,
                                         U::broadcast(load_i32(x + c * a.k + 4 * t)));
#else  // signs move onto x: |w| <= 128 keeps maddubs' pairs inside int16
        const I wu = U::sign(w, w);
        for (int c = 0; c < RX; ++c)
          acc[t % kChains][c] = U::quads(
              acc[t % kChains][c], wu, U::sign(U::broadcast(load_i32(x + c * a.k + 4 * t)), w));
#endif
      }
    } else {
#pragma GCC unroll 4
      for (int t = 0; t < 4; ++t) {  // low nibbles: values 4t.., high: values 16 + 4t..
        const I v = u.quants(block + 32 * t);
        const I lo = U::and_(v, low4);
        const I hi = U::and_(U::srli16(v, 4), low4);
        for (int c = 0; c < RX; ++c) {
          const int8_t* xc = x + c * a.k + 4 * t;
          acc[0][c] = U::quads(acc[0][c], lo, U::broadcast(load_i32(xc)));
          acc[kChains - 1][c] = U::quads(acc[kChains - 1][c], hi, U::broadcast(load_i32(xc + 16)));
        }
      }
    }
    const typename U::F dw = u.halves(&Panel::d, b);
    typename U::F mw;
    if constexpr (QT == kQ4_1) mw = u.halves(&Panel::m, b);
    for (int c = 0; c < RX; ++c) {
      const int64_t xb = (m0 + c) * a.nb + b;
      I isum = kChains == 2 ? U::add(acc[0][c], acc[kChains - 1][c]) : acc[0][c];
      if constexpr (sum_offset<QT>() != 0)
        isum = U::sub(isum, U::broadcast(sum_offset<QT>() * a.sum[xb]));
      const typename U::F scale = U::mul(dw, U::set1(a.d[xb]));
      out[c] = U::fmadd(U::to_float(isum), scale, out[c]);
      if constexpr (QT == kQ4_1) out[c] = U::fmadd(mw, U::set1(a.s[xb]), out[c]);
    }
  }
}

// y[m0 + c, n0 + r] for the unit's first `rows` rows and activation rows c < RX, the dot
// over blocks [b0, b1) continued from y's values if `add` (a later span), else from 0.
template <int64_t QT, int RX, class U>
void tile(const U& u, int64_t n0, int rows, const Acts& a, int64_t m0, int64_t b0, int64_t b1,
          bool add, float* y, int64_t ldy) {
  typename U::F out[RX];
  for (int c = 0; c < RX; ++c)
    out[c] = add ? U::load_rows(y + (m0 + c) * ldy + n0, rows) : U::zero_f();
  panel_blocks<QT, RX>(u, a, m0, b0, b1, out);
  for (int c = 0; c < RX; ++c) U::store_rows(y + (m0 + c) * ldy + n0, out[c], rows);
}
#else
// Weight value j (0..31) of row r in a panel block (see the layout above).
template <int64_t QT>
inline int32_t weight_value(const uint8_t* block, int r, int j) {
  if constexpr (QT == kQ8_0) return static_cast<int8_t>(block[(j / 4 * kPanelRows + r) * 4 + j % 4]);
  const int byte_index = j % 16;
  const uint8_t byte = block[(byte_index / 4 * kPanelRows + r) * 4 + byte_index % 4];
  const int32_t q = j < 16 ? byte & 0x0F : byte >> 4;
  return QT == kQ4_0 ? q - 8 : q;
}

struct OnePanel {
  Panel p;
};

// Portable tile: the same arithmetic, one (weight row, activation row) pair at a time.
template <int64_t QT, int RX, class U>
void tile(const U& u, int64_t n0, int rows, const Acts& a, int64_t m0, int64_t b0, int64_t b1,
          bool add, float* y, int64_t ldy) {
  const Panel& p = u.p;
  constexpr int kBlockBytes = kPanelRows * quant_bytes<QT>();
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < RX; ++c) {
      const int8_t* xq = a.q + (m0 + c) * a.k;
      float out = add ? y[(m0 + c) * ldy + n0 + r] : 0.0f;
      for (int64_t b = b0; b < b1; ++b) {
        int32_t isum = 0;
        for (int j = 0; j < kBlock; ++j)
          isum += weight_value<QT>(p.q + b * kBlockBytes, r, j) * xq[b * kBlock + j];
        const int64_t xb = (m0 + c) * a.nb + b;
        out = std::fma(static_cast<float>(isum), f16_to_f32(p.d[8 * b + r]) * a.d[xb], out);
        if constexpr (QT == kQ4_1) out = std::fma(f16_to_f32(p.m[8 * b + r]), a.s[xb], out);
      }
      y[(m0 + c) * ldy + n0 + r] = out;
    }
  }
}
#endif

// Panel p's arrays. A full panel is read in place; the last one, of N % 8 rows, is copied
// into `pad` zero-padded to 8 rows (so the kernels only ever see full panels).
template <int64_t QT>
Panel panel_at(const Weights& w, int64_t p, std::vector<uint8_t>& pad) {
  constexpr int64_t steps = quant_bytes<QT>() / 4;
  const int64_t n0 = p * kPanelRows, rows = std::min<int64_t>(kPanelRows, w.n - n0);
  const uint8_t* q = w.qs + n0 * w.nb * quant_bytes<QT>();
  const uint16_t* d = w.d + n0 * w.nb;
  const uint16_t* m = w.m ? w.m + n0 * w.nb : nullptr;
  if (rows == kPanelRows) return Panel{q, d, m};
  const int64_t q_bytes = w.nb * steps * kPanelRows * 4, s_bytes = w.nb * kPanelRows * 2;
  pad.assign(q_bytes + 2 * s_bytes, 0);
  uint8_t* pq = pad.data();
  auto* pd = reinterpret_cast<uint16_t*>(pad.data() + q_bytes);
  auto* pm = reinterpret_cast<uint16_t*>(pad.data() + q_bytes + s_bytes);
  for (int64_t u = 0; u < w.nb * steps; ++u)  // unit u = (block, step): rows x 4 bytes
    std::memcpy(pq + u * kPanelRows * 4, q + u * rows * 4, rows * 4);
  for (int64_t b = 0; b < w.nb; ++b) {
    std::memcpy(pd + b * kPanelRows, d + b * rows, rows * 2);
    if (m) std::memcpy(pm + b * kPanelRows, m + b * rows, rows * 2);
  }
  return Panel{pq, pd, m ? pm : nullptr};
}

// Activation rows per tile in prefill: an accumulator and an output each, so 8 rows need
// AVX-512's 32 vector registers.
#if defined(__AVX512VL__)
constexpr int kTileRows = 8;
#else
constexpr int kTileRows = 4;
#endif

// Panels per unit of work in prefill: with AVX-512, two adjacent panels run as one 16-row
// panel (Q8_0 GEMM at M = 256: 510-575 -> 830-915 GOPS). Decode keeps 8-row panels: SmolLM2
// decoded at 125 tok/s with pairs, 130-143 without (same run, alternating). Both give the
// same bits, so a row's output still does not depend on M.
#ifdef LQ_AVX512
constexpr int64_t kPrefillUnitPanels = 2;
#else
constexpr int64_t kPrefillUnitPanels = 1;
#endif
constexpr int64_t kMaxDecodeRows = 4;

// Activation rows [m0, m0 + count) against a unit of panels, RX rows at a time, blocks
// [b0, b1). `rows`: of the unit.
template <int64_t QT, class U>
void tiles(const U& u, int64_t n0, int rows, const Acts& a, int64_t m0, int64_t count,
           int64_t b0, int64_t b1, float* y, int64_t ldy) {
  const bool add = b0 > 0;
  int64_t c = 0;
  for (; c + kTileRows <= count; c += kTileRows)
    tile<QT, kTileRows>(u, n0, rows, a, m0 + c, b0, b1, add, y, ldy);
  const auto rest = [&]<int RX>() { tile<QT, RX>(u, n0, rows, a, m0 + c, b0, b1, add, y, ldy); };
  switch (count - c) {
    case 1: rest.template operator()<1>(); break;
    case 2: rest.template operator()<2>(); break;
    case 3: rest.template operator()<3>(); break;
#if defined(__AVX512VL__)
    case 4: rest.template operator()<4>(); break;
    case 5: rest.template operator()<5>(); break;
    case 6: rest.template operator()<6>(); break;
    case 7: rest.template operator()<7>(); break;
#endif
    default: break;
  }
}

// Bytes of activations per block and row, the share of a core's L2 a block of activation
// rows may take (every panel rereads it), and the most rows in such a block.
constexpr int64_t kActBudget = 384 << 10;
constexpr int64_t kMaxRowBlock = 256;

// Blocked like a BLAS: for a block of <= 256 activation rows and a span of blocks whose
// activations fit kActBudget, each of this thread's panels sweeps all those rows, its span
// (<= 12 KB) staying in L1 meanwhile. Decode (M <= 8) is one span: each thread streams its
// panels once, in memory order.
template <int64_t QT>
void gemm(const Weights& w, const Acts& a, int64_t num_rows, float* y) {
  const int64_t num_panels = (w.n + kPanelRows - 1) / kPanelRows;
  const int64_t row_block = std::min(num_rows, kMaxRowBlock);
  const int64_t span = std::clamp<int64_t>(kActBudget / (row_block * kBlock), 1, w.nb);
  // Enough work per task to pay for waking a thread (~2-3 us): ~192K multiply-adds, so
  // SmolLM2's k/v (192 x 576) run on one thread and its q/o (576 x 576) on two.
  const int64_t unit_panels = num_rows > kMaxDecodeRows ? kPrefillUnitPanels : 1;
  const int64_t grain = std::max<int64_t>(
      1, (192 << 10) / (unit_panels * kPanelRows * a.k * num_rows));
  const int64_t num_units = (num_panels + unit_panels - 1) / unit_panels;
  at::parallel_for(0, num_units, grain, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> pad;  // only the last panel is ever padded
    for (int64_t m0 = 0; m0 < num_rows; m0 += row_block) {
      const int64_t count = std::min(row_block, num_rows - m0);
      for (int64_t b0 = 0; b0 < w.nb; b0 += span) {
        const int64_t b1 = std::min(w.nb, b0 + span);
        for (int64_t u = begin; u < end; ++u) {
          const int64_t p = u * unit_panels, n0 = p * kPanelRows;
          const int64_t panels = std::min(unit_panels, num_panels - p);
          const int rows = static_cast<int>(std::min<int64_t>(panels * kPanelRows, w.n - n0));
          const Panel first = panel_at<QT>(w, p, pad);
#ifdef LQ_AVX512
          if (panels == 2) {
            const TwoPanels two{first, panel_at<QT>(w, p + 1, pad)};
            tiles<QT>(two, n0, rows, a, m0, count, b0, b1, y, w.n);
            continue;
          }
#endif
          tiles<QT>(OnePanel{first}, n0, rows, a, m0, count, b0, b1, y, w.n);
        }
      }
    }
  });
}

struct QuantizedRows {
  at::Tensor q, d, s, sum;
};

QuantizedRows quantize_rows_impl(const at::Tensor& x) {
  const int64_t num_rows = x.size(0), k = x.size(1), nb = k / kBlock;
  QuantizedRows out{at::empty({num_rows, k}, x.options().dtype(at::kChar)),
                    at::empty({num_rows, nb}, x.options()), at::empty({num_rows, nb}, x.options()),
                    at::empty({num_rows, nb}, x.options().dtype(at::kInt))};
  const float* xp = x.const_data_ptr<float>();
  int8_t* qp = out.q.mutable_data_ptr<int8_t>();
  float* dp = out.d.mutable_data_ptr<float>();
  float* sp = out.s.mutable_data_ptr<float>();
  int32_t* ip = out.sum.mutable_data_ptr<int32_t>();
  const int64_t grain = std::max<int64_t>(1, 16384 / k);
  at::parallel_for(0, num_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      quantize_row(xp + i * k, nb, qp + i * k, dp + i * nb, sp + i * nb, ip + i * nb);
  });
  return out;
}

void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 &&
                  x.is_contiguous(),
              "x must be a contiguous 2-D float32 CPU tensor, got ", x.scalar_type(), " ",
              x.sizes());
  TORCH_CHECK(x.size(1) % kBlock == 0, "x has ", x.size(1), " columns, not a multiple of 32");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x) {
  check_x(x);
  QuantizedRows r = quantize_rows_impl(x);
  return {r.q, r.d, r.s};
}

Weights check_weights(const at::Tensor& qs, const at::Tensor& d, const std::optional<at::Tensor>& m,
                      int64_t qtype, int64_t k) {
  TORCH_CHECK(qtype == kQ8_0 || qtype == kQ4_0 || qtype == kQ4_1,
              "qtype must be 2 (Q4_0), 3 (Q4_1) or 8 (Q8_0), got ", qtype);
  const int64_t n = qs.size(0), nb = k / kBlock;
  const int64_t qb = qtype == kQ8_0 ? 32 : 16;
  TORCH_CHECK(qs.scalar_type() == at::kByte && qs.is_contiguous() && qs.dim() == 2 &&
                  qs.size(1) == nb * qb,
              "qs must be contiguous uint8 [N, ", nb * qb, "], got ", qs.scalar_type(), " ",
              qs.sizes());
  TORCH_CHECK(d.scalar_type() == at::kHalf && d.is_contiguous() && d.dim() == 2 &&
                  d.size(0) == n && d.size(1) == nb,
              "d must be contiguous float16 [", n, ", ", nb, "], got ", d.scalar_type(), " ",
              d.sizes());
  const bool has_min = m.has_value();
  TORCH_CHECK(has_min == (qtype == kQ4_1), "m must be given for Q4_1 and only for Q4_1");
  if (has_min)
    TORCH_CHECK(m->scalar_type() == at::kHalf && m->is_contiguous() && m->sizes() == d.sizes(),
                "m must be contiguous float16 shaped like d, got ", m->sizes());
  return Weights{qs.const_data_ptr<uint8_t>(),
                 reinterpret_cast<const uint16_t*>(d.const_data_ptr<at::Half>()),
                 has_min ? reinterpret_cast<const uint16_t*>(m->const_data_ptr<at::Half>())
                         : nullptr,
                 n, nb};
}

at::Tensor qlinear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d,
                   const std::optional<at::Tensor>& m, int64_t qtype) {
  check_x(x);
  const Weights w = check_weights(qs, d, m, qtype, x.size(1));
  const int64_t num_rows = x.size(0);
  at::Tensor y = at::empty({num_rows, w.n}, x.options());
  if (num_rows == 0 || w.n == 0) return y;
  const QuantizedRows xq = quantize_rows_impl(x);
  const Acts a{xq.q.const_data_ptr<int8_t>(), xq.d.const_data_ptr<float>(),
               xq.s.const_data_ptr<float>(), xq.sum.const_data_ptr<int32_t>(), x.size(1), w.nb};
  float* yp = y.mutable_data_ptr<float>();
  if (qtype == kQ8_0) gemm<kQ8_0>(w, a, num_rows, yp);
  else if (qtype == kQ4_0) gemm<kQ4_0>(w, a, num_rows, yp);
  else gemm<kQ4_1>(w, a, num_rows, yp);
  return y;
}

std::string isa() {
#if defined(LQ_VNNI) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
  return "avx512+vnni";  // k_gemm.cpp's prefill panels use 512-bit vectors
#elif defined(LQ_VNNI)
  return "avx2+vnni";
#elif defined(LQ_AVX2)
  return "avx2";
#else
  return "scalar";
#endif
}

}  // namespace

TORCH_LIBRARY(levante_quant, lib) {
  lib.def("qlinear(Tensor x, Tensor qs, Tensor d, Tensor? m, int qtype) -> Tensor");
  lib.def("quantize_rows(Tensor x) -> (Tensor, Tensor, Tensor)");
  lib.def("isa() -> str", &isa);
}

TORCH_LIBRARY_IMPL(levante_quant, CPU, lib) {
  lib.impl("qlinear", &qlinear);
  lib.impl("quantize_rows", &quantize_rows);
}
