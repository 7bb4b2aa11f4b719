// Matmul on GGUF K-quant weights (Q4_K, Q6_K, ...) on CPU: y[M, N] = x[M, K] @ W[N, K]^T,
// W given as the file's own bytes, blocks [N, K / 256 * type_size] uint8, never repacked.
//
// As llama.cpp does it, each row of x is quantized once per call to 8 bits per super-block
// of 256 (Q8_K: float dx, int8 xq, int16 sums of 16), and each (weight super-block,
// activation super-block) pair is an exact integer dot product scaled once in float:
//   dx * (d * sum_g scale[g] * sum_{e in g} q[e] * xq[e]  -  dm * sum_g min[g] * bsum[g]).
// A type only says how to decode its super-block into (q, scale, min, d, dm), the
// `Unpacked` form of kquants/kquant.h (which also says how to add a type); everything below
// is written once for all types. The registry is LQ_KQUANT_TYPES.
//
// Decode (M <= 4) is bound by memory bandwidth: each thread streams its share of the weight
// rows in file order (one sequential stream, prefetched), unpacks each super-block into
// registers/L1 and dots it with the M activation rows (AVX2 maddubs: 32 unsigned weights
// x 32 int8 activations -> 16 pair sums; madd / VNNI dpwssd with the scales -> int32).
//
// Prefill (M >= 5) is bound by arithmetic: the weights are unpacked into panels of 16 rows
// (8 without AVX-512) laid out for SIMD across rows (lane r of a vector = weight row r), and
// the activations into tiles of 8 rows (4 without AVX-512's 32 registers) interleaved the
// same way. One VNNI dpbusd (or maddubs + madd) then takes 4 weights of each row of the
// panel times the same 4 activations (a broadcast load) into int32 lanes; a group's scale is
// applied once per 4-8 such steps with one multiply, the float scales once per super-block
// with one FMA for the panel's outputs, with no horizontal sums. Blocked like a BLAS: for
// <= 256 activation rows and a span of super-blocks whose activations fit ~384 KB of L2, each
// panel span is unpacked once and swept by all those rows. Measured on the dev box's AMD
// EPYC, 2 threads, M = 256 (benchmarks/kernels.py --kquant): ~570-600 GOPS with 8-row panels
// and 256-bit vectors, 900-1020 with 16-row panels and 512-bit ones; unpacking costs ~30
// cycles per super-block and row, paid back from M ~ 5 on.
//
// Batch invariance (issue 18): a row's output is the same bits whatever M is. Both paths
// total each (weight super-block, activation super-block) pair's integer sums exactly and
// add them into the output with the same two float operations, super-block after
// super-block: out = fma(float(isum), d * dx, out); out = fnma(float(imin), dm * dx, out).
//
// Without AVX2 (-march=x86-64, ARM) the same integers are computed with plain loops.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "simd.h"
#include "kquants/kquant.h"
#include "kquants/q2_k.h"
#include "kquants/q3_k.h"
#include "kquants/q4_k.h"
#include "kquants/q5_k.h"
#include "kquants/q6_k.h"

// The registry: every K-quant type the kernels take, X(struct) per line (see kquant.h).
#define LQ_KQUANT_TYPES(X) \
  X(Q2K)                   \
  X(Q3K)                   \
  X(Q4K)                   \
  X(Q5K)                   \
  X(Q6K)

namespace {

using namespace levante::simd;  // NOLINT: the kernels' SIMD vocabulary

using levante::kquant::kGroup;
using levante::kquant::kGroups;
using levante::kquant::kSuperBlock;
using levante::kquant::Unpacked;
#define LQ_USING(T) using levante::kquant::T;
LQ_KQUANT_TYPES(LQ_USING)
#undef LQ_USING

// Calls f.template operator()<T>() for the type whose ggml id is `qtype`; false if none.
template <class F>
bool with_type(int64_t qtype, F&& f) {
  switch (qtype) {
#define LQ_CASE(T)               \
  case T::kTypeId:               \
    f.template operator()<T>();  \
    return true;
    LQ_KQUANT_TYPES(LQ_CASE)
#undef LQ_CASE
    default:
      return false;
  }
}

std::string type_names() {
  std::string names;
#define LQ_NAME(T) names += std::string(names.empty() ? "" : ", ") + T::kName + " (" + \
                            std::to_string(T::kTypeId) + ")";
  LQ_KQUANT_TYPES(LQ_NAME)
#undef LQ_NAME
  return names;
}

// Activations quantized per super-block (llama.cpp's Q8_K, in three arrays).
struct Acts {
  const int8_t* q;      // [M, K]
  const float* d;       // [M, nb]: x ~ d * q
  const int16_t* bsum;  // [M, K / 16]: sum of q over each group of 16
  int64_t k, nb;

  const int8_t* qb(int64_t row, int64_t b) const { return q + row * k + b * kSuperBlock; }
  const int16_t* sb(int64_t row, int64_t b) const { return bsum + (row * nb + b) * kGroups; }
  float db(int64_t row, int64_t b) const { return d[row * nb + b]; }
};

#ifdef LQ_AVX2
inline __m256i load256(const void* p) {
  return _mm256_loadu_si256(static_cast<const __m256i*>(p));
}
#endif

// ---------------------------------------------------------------------------------------
// Activations: one row of x -> Q8_K. Per super-block d = amax / 127, q = round(x * 127 / amax)
// (ties to even; all 0 if amax = 0), bsum[g] = sum of q over group g of 16.
void quantize_row(const float* x, int64_t nb, int8_t* q, float* d, int16_t* bsum) {
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * kSuperBlock;
    int8_t* qb = q + b * kSuperBlock;
    int16_t* sb = bsum + b * kGroups;
#ifdef LQ_AVX2
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 mx = _mm256_setzero_ps();
    for (int i = 0; i < kSuperBlock; i += 8)
      mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + i)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
#else
    float amax = 0.0f;
    for (int i = 0; i < kSuperBlock; ++i) amax = std::max(amax, std::fabs(xb[i]));
#endif
    const float inv = amax != 0.0f ? 127.0f / amax : 0.0f;
    d[b] = amax / 127.0f;
#ifdef LQ_AVX2
    const __m256 vinv = _mm256_set1_ps(inv);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int i = 0; i < kSuperBlock; i += 32) {
      __m256i iv[4];
      for (int j = 0; j < 4; ++j) {
        const __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(xb + i + 8 * j), vinv),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        iv[j] = _mm256_cvtps_epi32(r);
      }
      sb[i / kGroup] = static_cast<int16_t>(hsum_i32(_mm256_add_epi32(iv[0], iv[1])));
      sb[i / kGroup + 1] = static_cast<int16_t>(hsum_i32(_mm256_add_epi32(iv[2], iv[3])));
      // packs work per 128-bit lane: undo the lane interleave with a permute.
      const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(iv[0], iv[1]),
                                           _mm256_packs_epi32(iv[2], iv[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb + i),
                          _mm256_permutevar8x32_epi32(p, order));
    }
#else
    for (int g = 0; g < kGroups; ++g) {
      int sum = 0;
      for (int i = g * kGroup; i < (g + 1) * kGroup; ++i) {
        const int v = static_cast<int>(std::nearbyint(xb[i] * inv));
        qb[i] = static_cast<int8_t>(v);
        sum += v;
      }
      sb[g] = static_cast<int16_t>(sum);
    }
#endif
  }
}

struct QuantizedRows {
  at::Tensor q, d, bsum;
};

QuantizedRows quantize_rows_impl(const at::Tensor& x) {
  const int64_t num_rows = x.size(0), k = x.size(1), nb = k / kSuperBlock;
  QuantizedRows out{at::empty({num_rows, k}, x.options().dtype(at::kChar)),
                    at::empty({num_rows, nb}, x.options()),
                    at::empty({num_rows, nb * kGroups}, x.options().dtype(at::kShort))};
  const float* xp = x.const_data_ptr<float>();
  int8_t* qp = out.q.mutable_data_ptr<int8_t>();
  float* dp = out.d.mutable_data_ptr<float>();
  int16_t* sp = out.bsum.mutable_data_ptr<int16_t>();
  const int64_t grain = std::max<int64_t>(1, 16384 / k);
  at::parallel_for(0, num_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      quantize_row(xp + i * k, nb, qp + i * k, dp + i * nb, sp + i * nb * kGroups);
  });
  return out;
}

// The weight: row n's super-block b starts at rows + n * row_bytes + b * T::kBlockBytes.
struct Weights {
  const uint8_t* rows;
  int64_t n, nb, row_bytes;
};

#ifdef LQ_AVX2
// ---------------------------------------------------------------------------------------
// Decode: a weight row at a time against RX activation rows.

constexpr int64_t kPrefetch = 1536;  // bytes of the weight stream requested ahead of use

// The scales as maddubs needs them: chunk k (weights 32k..32k+31) leaves the pair sums of
// groups 2k / 2k + 1 in int16 lanes 0-7 / 8-15, so chunk_scales(t, k) has scale[2k] in lanes
// 0-7 and scale[2k + 1] in lanes 8-15. t = scale_table(scale) holds the even-numbered scales
// in its low 128 bits and the odd ones in its high 128 bits; one in-lane shuffle then picks
// word k of each half.
inline __m256i scale_table(const int16_t* scale) {
  const __m256i evens_odds = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14,
                                              15, 0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11,
                                              14, 15);
  return _mm256_permute4x64_epi64(_mm256_shuffle_epi8(load256(scale), evens_odds), 0xD8);
}

inline __m256i chunk_scales(__m256i table, int k) {
  const auto word_k = static_cast<int16_t>(0x0100 + 0x0202 * k);  // bytes 2k, 2k + 1
  return _mm256_shuffle_epi8(table, _mm256_set1_epi16(word_k));
}

// The exact totals of isum[c] and imin[c] (8 int32 lanes each), as floats in lane c of
// `itotal` / `mtotal` (c < RX <= 4; other lanes are junk): pairwise sums of all of them at
// once, so that 4 rows cost little more than 1.
template <int RX>
inline void row_totals(const __m256i* isum, const __m256i* imin, __m128& itotal,
                       __m128& mtotal) {
  __m256i p[4];  // p[c] = [i01 i23 m01 m23 | i45 i67 m45 m67] of row c (rows >= RX: junk)
  for (int c = 0; c < 4; ++c) p[c] = c < RX ? _mm256_hadd_epi32(isum[c], imin[c]) : p[0];
  if constexpr (RX == 1) {
    const __m128i t = _mm_add_epi32(_mm256_castsi256_si128(p[0]),
                                    _mm256_extracti128_si256(p[0], 1));
    itotal = _mm_cvtepi32_ps(_mm_hadd_epi32(t, t));  // [I0 M0 I0 M0]
    mtotal = _mm_movehdup_ps(itotal);
    return;
  }
  __m128 f[2];  // f[j] = [I M I M] of rows 2j, 2j + 1
  for (int j = 0; j < (RX > 2 ? 2 : 1); ++j) {
    const __m256i q = _mm256_hadd_epi32(p[2 * j], p[2 * j + 1]);
    f[j] = _mm_cvtepi32_ps(_mm_add_epi32(_mm256_castsi256_si128(q),
                                         _mm256_extracti128_si256(q, 1)));
  }
  if constexpr (RX <= 2) f[1] = f[0];
  itotal = _mm_shuffle_ps(f[0], f[1], _MM_SHUFFLE(2, 0, 2, 0));
  mtotal = _mm_shuffle_ps(f[0], f[1], _MM_SHUFFLE(3, 1, 3, 1));
}

// isum[c] / imin[c] (8 int32 lanes each, to be totalled) of this super-block and activation
// row c: the quants' dot with the scales, and the mins' with the activation sums.
template <int RX>
inline void superblock_sums(const Unpacked& u, const Acts& a, int64_t b, __m256i* isum,
                            __m256i* imin) {
  // Two accumulators per row (even / odd chunks) halve the chain of dependent dpwssd.
  __m256i odd[RX];
  for (int c = 0; c < RX; ++c) isum[c] = odd[c] = _mm256_setzero_si256();
  const __m256i table = scale_table(u.scale);
#pragma GCC unroll 8
  for (int k = 0; k < kSuperBlock / 32; ++k) {
    const __m256i w = load256(u.q + 32 * k);
    const __m256i s = chunk_scales(table, k);
    for (int c = 0; c < RX; ++c) {
      const __m256i p = _mm256_maddubs_epi16(w, load256(a.qb(c, b) + 32 * k));
      if (k % 2) odd[c] = dot_pairs(odd[c], p, s);
      else isum[c] = dot_pairs(isum[c], p, s);
    }
  }
  const __m256i mins = load256(u.min);
  for (int c = 0; c < RX; ++c) {
    isum[c] = _mm256_add_epi32(isum[c], odd[c]);
    imin[c] = _mm256_madd_epi16(mins, load256(a.sb(c, b)));
  }
}

// acc lane c += a super-block's part of row c's dot, as the prefill panels do it: the integer
// sums totalled exactly, then acc = fma(total, d * dx, acc), acc = fnma(min total, dm * dx,
// acc). (Keeping 8 partial float sums per row until the row's end was cheaper, but a row's
// output then depended on how many rows shared the call: issue 18.)
template <int RX>
inline __m128 accumulate(const __m256i* isum, const __m256i* imin, float d, float dm,
                         __m128 dx, __m128 acc) {
  __m128 itotal, mtotal;
  row_totals<RX>(isum, imin, itotal, mtotal);
  acc = _mm_fmadd_ps(itotal, _mm_mul_ps(_mm_set1_ps(d), dx), acc);
  return _mm_fnmadd_ps(mtotal, _mm_mul_ps(_mm_set1_ps(dm), dx), acc);
}

// dx_by_block[4b + c] = activation row c's scale of super-block b (c < RX).
template <class T, int RX>
void decode_rows(const Weights& w, int64_t n_begin, int64_t n_end, const Acts& a,
                 const float* dx_by_block, float* y) {
  alignas(32) Unpacked u;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row = w.rows + n * w.row_bytes;
    __m128 acc = _mm_setzero_ps();
    // Block b's totals enter acc after block b + 1's sums: the totals' shuffles then overlap
    // the next block's work instead of lengthening its chain (in order, M = 1 took ~20% more
    // time per super-block than with 8 float lanes per row; this way ~2-9%).
    __m256i isum[RX], imin[RX];
    float d = 0.0f, dm = 0.0f;
    for (int64_t b = 0; b < w.nb; ++b) {
      const uint8_t* block = row + b * T::kBlockBytes;
      for (int off = 0; off < T::kBlockBytes; off += 64)
        _mm_prefetch(reinterpret_cast<const char*>(block + kPrefetch + off), _MM_HINT_T0);
      T::unpack(block, u);
      __m256i next_isum[RX], next_imin[RX];
      superblock_sums<RX>(u, a, b, next_isum, next_imin);
      if (b > 0)
        acc = accumulate<RX>(isum, imin, d, dm, _mm_loadu_ps(dx_by_block + 4 * (b - 1)), acc);
      for (int c = 0; c < RX; ++c) {
        isum[c] = next_isum[c];
        imin[c] = next_imin[c];
      }
      d = u.d;
      dm = u.dm;
    }
    acc = accumulate<RX>(isum, imin, d, dm, _mm_loadu_ps(dx_by_block + 4 * (w.nb - 1)), acc);
    alignas(16) float lanes[4];
    _mm_store_ps(lanes, acc);
    for (int c = 0; c < RX; ++c) y[c * w.n + n] = lanes[c];
  }
}

// ---------------------------------------------------------------------------------------
// Prefill: panels of W weight rows, SIMD across rows: W = 16 with AVX-512 (this dev box's
// AMD EPYC runs 512-bit dpbusd at the 256-bit rate, so twice the multiply-adds per cycle:
// 7.2 G/s of each on one core, measured), else 8.

constexpr int kSteps = kSuperBlock / 4;  // 4-weight steps per super-block

#ifdef LQ_AVX512
constexpr int kPanelRows = 16;
#else
constexpr int kPanelRows = 8;
#endif
using PanelLanes = Lanes<kPanelRows>;  // simd.h

// One super-block of kPanelRows weight rows; lane / dword r belongs to row r.
struct alignas(64) PanelBlock {
  PanelLanes::I q[kSteps];            // q[s] dword r: weights 4s..4s+3 of row r (4 bytes)
  PanelLanes::I scale[kGroups];       // scale[g] int32 lane r: row r's scale of group g
  PanelLanes::I min[kGroups / 2];     // min[p] dword r: row r's mins of groups 2p, 2p + 1
  alignas(64) float d[kPanelRows], dm[kPanelRows];
};

// v[i] dword j <-> v[j] dword i.
inline void transpose8(__m256i v[8]) {
  __m256i t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_epi32(v[i], v[i + 1]);
    t[i + 1] = _mm256_unpackhi_epi32(v[i], v[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x20);
    v[i + 4] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x31);
  }
}

// Where a panel sits: weight rows [n0, n0 + rows) (rows <= kPanelRows), super-blocks
// [b0, b0 + nb).
struct PanelSpan {
  int64_t n0;
  int rows;
  int64_t b0, nb;
};

// Rows 8h .. 8h + 7 of a panel vector (the 32-byte half h of it).
inline __m256i* half(PanelLanes::I* v, int h) { return reinterpret_cast<__m256i*>(v) + h; }

// Unpack the span's super-blocks into panel[0..nb); missing rows are zero.
template <class T>
void fill_panel(const Weights& w, const PanelSpan& span, PanelBlock* panel) {
  alignas(32) Unpacked u[kPanelRows];
  const int rows = span.rows;
  std::memset(static_cast<void*>(u + rows), 0, sizeof(Unpacked) * (kPanelRows - rows));
  __m256i v[8];
  for (int64_t i = 0; i < span.nb; ++i) {
    for (int r = 0; r < rows; ++r)
      T::unpack(w.rows + (span.n0 + r) * w.row_bytes + (span.b0 + i) * T::kBlockBytes, u[r]);
    PanelBlock& p = panel[i];
    for (int h = 0; h < kPanelRows / 8; ++h) {  // 8 rows at a time: transposes of 8 x 8 dwords
      const Unpacked* uh = u + 8 * h;
      for (int j = 0; j < kSteps / 8; ++j) {
        for (int r = 0; r < 8; ++r) v[r] = load256(uh[r].q + 32 * j);
        transpose8(v);
        for (int t = 0; t < 8; ++t) _mm256_store_si256(half(p.q + 8 * j + t, h), v[t]);
      }
      for (int g = 0; g < 2; ++g) {
        for (int r = 0; r < 8; ++r)
          v[r] = _mm256_cvtepi16_epi32(_mm_load_si128(
              reinterpret_cast<const __m128i*>(uh[r].scale + 8 * g)));
        transpose8(v);
        for (int t = 0; t < 8; ++t) _mm256_store_si256(half(p.scale + 8 * g + t, h), v[t]);
      }
      for (int r = 0; r < 8; ++r) v[r] = load256(uh[r].min);
      transpose8(v);
      for (int t = 0; t < 8; ++t) _mm256_store_si256(half(p.min + t, h), v[t]);
    }
    for (int r = 0; r < kPanelRows; ++r) {
      p.d[r] = u[r].d;
      p.dm[r] = u[r].dm;
    }
  }
}

// Activation rows per panel tile: 3 accumulators each, so 8 rows need AVX-512's 32 vector
// registers, and VNNI (without it, a step's 3 instructions need temporaries: 8 rows ran
// slower than 4 in a -march=skylake-avx512 build).
#if defined(__AVX512VL__) && defined(LQ_VNNI)
constexpr int kTileRows = 8;
#else
constexpr int kTileRows = 4;
#endif

// One super-block of kTileRows activation rows interleaved like a panel, so that a tile
// reads all of them through one pointer: q[s][c] holds xq[4s..4s+3] of row c.
struct alignas(32) ActBlock {
  int32_t q[kSteps][kTileRows];
  int32_t bsum[kGroups / 2][kTileRows];  // bsum[p][c]: row c's sums of groups 2p, 2p + 1
  float d[kTileRows];
};

// Rows [m0, m0 + kTileRows) of `a` (rows past num_rows zero) -> tile[0..nb).
void fill_act_tile(const Acts& a, int64_t m0, int64_t num_rows, ActBlock* tile) {
  for (int64_t b = 0; b < a.nb; ++b) {
    ActBlock& t = tile[b];
    for (int c = 0; c < kTileRows; ++c) {
      const bool real = m0 + c < num_rows;
      const int8_t* xq = real ? a.qb(m0 + c, b) : nullptr;
      const int16_t* bs = real ? a.sb(m0 + c, b) : nullptr;
      for (int s = 0; s < kSteps; ++s) t.q[s][c] = real ? load_i32(xq + 4 * s) : 0;
      for (int pair = 0; pair < kGroups / 2; ++pair)
        t.bsum[pair][c] = real ? load_i32(bs + 2 * pair) : 0;
      t.d[c] = real ? a.db(m0 + c, b) : 0.0f;
    }
  }
}

// y[m0 + c, n0 + r] = the dot up to the span's end, for the panel's rows r < span.rows and
// activation rows c < num_valid of the tile; `add`: continue from y (not the first span).
template <bool kPer32>
void panel_tile(const PanelBlock* panel, const ActBlock* tile, const PanelSpan& span,
                float* y, int64_t ldy, int num_valid, bool add) {
  using L = PanelLanes;
  constexpr int RX = kTileRows;
  constexpr int kScaleGroups = kPer32 ? kGroups / 2 : kGroups;  // scales applied per block
  constexpr int kGroupSteps = kSteps / kScaleGroups;
  // A later span continues the sums in y rather than adding its own partial sums to them:
  // the spans' bounds depend on M, and a row's output must not (issue 18).
  L::F out[RX];
  for (int c = 0; c < RX; ++c)
    out[c] = add && c < num_valid ? L::load_rows(y + c * ldy + span.n0, span.rows) : L::zero_f();
  for (int64_t i = 0; i < span.nb; ++i) {
    const PanelBlock& p = panel[i];
    const ActBlock& x = tile[span.b0 + i];
    L::I isum[RX];
    for (int c = 0; c < RX; ++c) isum[c] = L::zero();
    for (int g = 0; g < kScaleGroups; ++g) {
      L::I acc[RX];
      for (int c = 0; c < RX; ++c) acc[c] = L::zero();
#pragma GCC unroll 8
      for (int j = 0; j < kGroupSteps; ++j) {
        const int s = g * kGroupSteps + j;
        const L::I wq = L::load(p.q + s);
        for (int c = 0; c < RX; ++c) acc[c] = L::quads(acc[c], wq, L::broadcast(x.q[s][c]));
      }
      const L::I sc = L::load(p.scale + (kPer32 ? 2 * g : g));
      for (int c = 0; c < RX; ++c) isum[c] = L::add(isum[c], L::mullo(acc[c], sc));
    }
    L::I imin[RX];
    for (int c = 0; c < RX; ++c) imin[c] = L::zero();
    for (int pair = 0; pair < kGroups / 2; ++pair) {
      const L::I mn = L::load(p.min + pair);
      for (int c = 0; c < RX; ++c) imin[c] = L::pairs(imin[c], mn, L::broadcast(x.bsum[pair][c]));
    }
    const L::F d = L::load_f(p.d), dm = L::load_f(p.dm);
    for (int c = 0; c < RX; ++c) {
      const L::F dx = L::set1(x.d[c]);
      out[c] = L::fmadd(L::to_float(isum[c]), L::mul(d, dx), out[c]);
      out[c] = L::fnmadd(L::to_float(imin[c]), L::mul(dm, dx), out[c]);
    }
  }
  for (int c = 0; c < num_valid; ++c) L::store_rows(y + c * ldy + span.n0, out[c], span.rows);
}

// Bytes of activations per super-block and tile row, and the share of a core's L2 that a
// block of them may take: the tiles reread them for every panel.
constexpr int64_t kActBytes = sizeof(ActBlock) / kTileRows;
constexpr int64_t kActBudget = 384 << 10;
constexpr int64_t kMaxRowBlock = 256;

// Blocked like a BLAS: for a block of <= 256 activation rows and of super-blocks that fits
// kActBudget, every panel of this thread's rows is unpacked (each weight super-block once
// per row block) and swept by all those rows, the block staying in L2 meanwhile.
template <class T>
void gemm_prefill(const Weights& w, const Acts& a, int64_t num_rows, float* y) {
  const int64_t num_tiles = (num_rows + kTileRows - 1) / kTileRows;
  // [tile][super-block], left uninitialized: fill_act_tile writes all of it.
  const std::unique_ptr<ActBlock[]> tiles(new ActBlock[num_tiles * w.nb]);
  at::parallel_for(0, num_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      fill_act_tile(a, t * kTileRows, num_rows, tiles.get() + t * w.nb);
  });
  const int64_t num_panels = (w.n + kPanelRows - 1) / kPanelRows;
  const int64_t tile_block = std::max<int64_t>(1, kMaxRowBlock / kTileRows);
  const int64_t row_block = std::min(num_tiles, tile_block) * kTileRows;
  const int64_t span_blocks = std::clamp<int64_t>(kActBudget / (row_block * kActBytes), 1, w.nb);
  // ~1M multiply-adds per task at least.
  const int64_t grain = std::max<int64_t>(1, (1 << 20) / (kPanelRows * a.k * num_rows));
  at::parallel_for(0, num_panels, grain, [&](int64_t begin, int64_t end) {
    const std::unique_ptr<PanelBlock[]> panel(new PanelBlock[span_blocks]);
    for (int64_t t0 = 0; t0 < num_tiles; t0 += tile_block) {
      const int64_t t1 = std::min(num_tiles, t0 + tile_block);
      for (int64_t b0 = 0; b0 < w.nb; b0 += span_blocks) {
        for (int64_t p = begin; p < end; ++p) {
          const int64_t n0 = p * kPanelRows;
          const PanelSpan span{n0, static_cast<int>(std::min<int64_t>(kPanelRows, w.n - n0)),
                               b0, std::min(span_blocks, w.nb - b0)};
          fill_panel<T>(w, span, panel.get());
          for (int64_t t = t0; t < t1; ++t) {
            const int64_t m0 = t * kTileRows;
            const int num_valid = static_cast<int>(std::min<int64_t>(kTileRows, num_rows - m0));
            panel_tile<T::kScalePer32>(panel.get(), tiles.get() + t * w.nb, span,
                                       y + m0 * w.n, w.n, num_valid, b0 > 0);
          }
        }
      }
    }
  });
}

// Up to this many activation rows, a weight super-block unpacked into registers is dotted
// with each row directly; past it, unpacking into panels (~30 cycles per super-block and
// row of W, measured) pays for itself with the 2.5x faster dpbusd-across-rows tiles.
constexpr int64_t kMaxDecodeRows = 4;

template <class T>
void gemm(const Weights& w, const Acts& a, int64_t num_rows, float* y) {
  if (num_rows > kMaxDecodeRows) return gemm_prefill<T>(w, a, num_rows, y);
  std::vector<float> dx_by_block(4 * w.nb, 0.0f);  // [b][row]: one vector load per block
  for (int64_t c = 0; c < num_rows; ++c)
    for (int64_t b = 0; b < w.nb; ++b) dx_by_block[4 * b + c] = a.db(c, b);
  const float* dx = dx_by_block.data();
  // Enough work per task to pay for waking a thread: ~256K multiply-adds.
  const int64_t grain = std::max<int64_t>(1, (256 << 10) / (a.k * num_rows));
  at::parallel_for(0, w.n, grain, [&](int64_t begin, int64_t end) {
    switch (num_rows) {
      case 1: decode_rows<T, 1>(w, begin, end, a, dx, y); break;
      case 2: decode_rows<T, 2>(w, begin, end, a, dx, y); break;
      case 3: decode_rows<T, 3>(w, begin, end, a, dx, y); break;
      default: decode_rows<T, 4>(w, begin, end, a, dx, y); break;
    }
  });
}
#else
// ---------------------------------------------------------------------------------------
// Portable: the same integers, one (weight row, activation row) pair at a time.
template <class T>
void gemm(const Weights& w, const Acts& a, int64_t num_rows, float* y) {
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / (a.k * num_rows));
  at::parallel_for(0, w.n, grain, [&](int64_t begin, int64_t end) {
    Unpacked u;
    std::vector<float> acc(num_rows);
    for (int64_t n = begin; n < end; ++n) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t b = 0; b < w.nb; ++b) {
        T::unpack(w.rows + n * w.row_bytes + b * T::kBlockBytes, u);
        for (int64_t c = 0; c < num_rows; ++c) {
          const int8_t* xq = a.qb(c, b);
          const int16_t* bs = a.sb(c, b);
          int32_t isum = 0, imin = 0;
          for (int g = 0; g < kGroups; ++g) {
            int32_t dot = 0;
            for (int e = g * kGroup; e < (g + 1) * kGroup; ++e) dot += u.q[e] * xq[e];
            isum += u.scale[g] * dot;
            imin += u.min[g] * bs[g];
          }
          const float dx = a.db(c, b);
          acc[c] += u.d * dx * static_cast<float>(isum) - u.dm * dx * static_cast<float>(imin);
        }
      }
      for (int64_t c = 0; c < num_rows; ++c) y[c * w.n + n] = acc[c];
    }
  });
}
#endif

// ---------------------------------------------------------------------------------------
// Ops.

void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 &&
                  x.is_contiguous(),
              "x must be a contiguous 2-D float32 CPU tensor, got ", x.scalar_type(), " ",
              x.sizes());
  TORCH_CHECK(x.size(1) % kSuperBlock == 0, "x has ", x.size(1),
              " columns; K-quant rows are whole super-blocks of 256");
}

int64_t block_bytes(int64_t qtype) {
  int64_t bytes = 0;
  const bool known = with_type(qtype, [&]<class T>() { bytes = T::kBlockBytes; });
  TORCH_CHECK(known, "qtype ", qtype, " is not a K-quant type these kernels take; they take ",
              type_names());
  return bytes;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_rows_k(const at::Tensor& x) {
  check_x(x);
  QuantizedRows r = quantize_rows_impl(x);
  return {r.q, r.d, r.bsum};
}

at::Tensor kquant_linear(const at::Tensor& x, const at::Tensor& blocks, int64_t qtype) {
  check_x(x);
  const int64_t bytes = block_bytes(qtype), nb = x.size(1) / kSuperBlock;
  TORCH_CHECK(blocks.device().is_cpu() && blocks.scalar_type() == at::kByte &&
                  blocks.dim() == 2 && blocks.is_contiguous() && blocks.size(1) == nb * bytes,
              "blocks must be contiguous uint8 [N, ", nb * bytes, "] (", nb, " super-blocks of ",
              bytes, " bytes per row for K = ", x.size(1), "), got ", blocks.scalar_type(), " ",
              blocks.sizes());
  const int64_t num_rows = x.size(0);
  at::Tensor y = at::empty({num_rows, blocks.size(0)}, x.options());
  if (num_rows == 0 || blocks.size(0) == 0) return y;
  if (nb == 0) return y.zero_();
  const QuantizedRows xq = quantize_rows_impl(x);
  const Acts a{xq.q.const_data_ptr<int8_t>(), xq.d.const_data_ptr<float>(),
               xq.bsum.const_data_ptr<int16_t>(), x.size(1), nb};
  const Weights w{blocks.const_data_ptr<uint8_t>(), blocks.size(0), nb, nb * bytes};
  float* yp = y.mutable_data_ptr<float>();
  with_type(qtype, [&]<class T>() { gemm<T>(w, a, num_rows, yp); });
  return y;
}

std::vector<int64_t> kquant_types() {
  std::vector<int64_t> ids;
#define LQ_ID(T) ids.push_back(T::kTypeId);
  LQ_KQUANT_TYPES(LQ_ID)
#undef LQ_ID
  return ids;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(levante_quant, lib) {
  lib.def("kquant_linear(Tensor x, Tensor blocks, int qtype) -> Tensor");
  lib.def("quantize_rows_k(Tensor x) -> (Tensor, Tensor, Tensor)");
  lib.def("kquant_types() -> int[]", &kquant_types);
}

TORCH_LIBRARY_IMPL(levante_quant, CPU, lib) {
  lib.impl("kquant_linear", &kquant_linear);
  lib.impl("quantize_rows_k", &quantize_rows_k);
}
