// Quantized GEMM for GGUF Q8_0 / Q4_0 / Q4_1 weights on CPU: y[M, N] = x[M, K] @ W[N, K]^T.
//
// As llama.cpp does it: each row of x is quantized to 8 bits in blocks of 32 (one float
// scale per block, plus the block's sum for the Q4 min term), then every (weight block,
// activation block) pair is an integer dot product of 32 byte pairs (AVX2 `maddubs`, or
// AVX-VNNI `dpbusd`), scaled once per block in float.
//
// Weight layout (made by levante.quant.kernels.repack from the GGUF blocks, lossless):
//   qs [N, nb * QB] uint8   the blocks' quants (QB = 32 for Q8_0, 16 for Q4), see below
//   d  [N, nb]      f16     per-block scale, as stored in the file
//   m  [N, nb]      f16     Q4_1 only: per-block min
// with nb = K / 32. A row's quants are 32-byte units: for Q8_0 one block (the file's int8
// values); for Q4 a pair of blocks, byte i holding value i of block 2p in its low nibble and
// of block 2p + 1 in its high nibble (one load and two masks give two blocks), then, if nb
// is odd, the last block's 16 file bytes (byte j = value j | value j + 16 << 4).
// Rows are stored in groups of kRows = 4 with their units interleaved: unit 0 of rows
// 0, 1, 2, 3, unit 1 of rows 0..3, ..., then the odd tails of rows 0..3; the last N % 4
// rows are stored alone. A tile of 4 rows thus reads one sequential stream, which this
// CPU's prefetchers follow at full speed (4 separate row streams ran 3-4x slower from DRAM).
//
// Per block b of output row n and activation row i (xq = quantized x, dx its scale,
// sx = dx * sum(xq)):
//   Q8_0: d[n,b] * dx[i,b] * sum_j w_j * xq_j              (w_j signed int8)
//   Q4_0: d[n,b] * dx[i,b] * sum_j q_j * xq_j - 8 * d[n,b] * sx[i,b]   ((q - 8) * d)
//   Q4_1: d[n,b] * dx[i,b] * sum_j q_j * xq_j + m[n,b] * sx[i,b]       (q * d + m)
// The integer sums are exact; only the float accumulation over blocks rounds.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LQ_AVX2 1
#include <immintrin.h>
#if defined(__AVXVNNI__)
#define LQ_VNNI 1
#define LQ_DPBUSD(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define LQ_VNNI 1
#define LQ_DPBUSD(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#endif
#endif

namespace {

// ggml's type ids (gguf.GGMLQuantizationType).
constexpr int64_t kQ4_0 = 2;
constexpr int64_t kQ4_1 = 3;
constexpr int64_t kQ8_0 = 8;
constexpr int64_t kBlock = 32;
constexpr int kRows = 4;  // rows interleaved per group in qs

struct Weights {
  const uint8_t* qs;
  const uint16_t* d;
  const uint16_t* m;  // Q4_1 only
  int64_t n, nb;
};

struct Acts {
  const int8_t* q;  // [M, K]
  const float* d;   // [M, nb]
  const float* s;   // [M, nb]: d * sum(q) per block
  int64_t k, nb;
};

inline float f16_to_f32(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }

#ifdef LQ_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
  return _mm_cvtsi128_si32(s);
}

// 16 packed bytes -> 32 unsigned 4-bit values: low nibbles in lanes 0-15, high in 16-31.
inline __m256i unpack_q4(const uint8_t* p) {
  const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(t), _mm_srli_epi16(t, 4), 1);
  return _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
}

// Sum of u[j] * s[j] over each group of 4 bytes: 8 int32. u unsigned, s signed; exact
// as long as pairs of products fit int16 (|u| <= 128, |s| <= 127), which holds here.
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#ifdef LQ_VNNI
  return LQ_DPBUSD(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}
#endif

// One row of x -> 8-bit blocks, llama.cpp's Q8 rule: d = amax / 127, q = round(x * 127 / amax)
// (ties to even), s = d * sum(q).
void quantize_row(const float* x, int64_t nb, int8_t* q, float* d, float* s) {
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
    s[b] = d[b] * static_cast<float>(sum);
  }
}

template <int64_t QT>
constexpr int64_t quant_bytes() { return QT == kQ8_0 ? 32 : 16; }

// Where rows [n0, n0 + rows) start in qs: groups take exactly their rows' bytes.
template <int64_t QT>
inline const uint8_t* group_base(const Weights& w, int64_t n0) {
  return w.qs + n0 * w.nb * quant_bytes<QT>();
}

// Quant value j (0..31) of block b of row r in a group of `rows` rows (see the layout above).
template <int64_t QT>
inline int32_t quant_value(const uint8_t* base, int rows, int r, int64_t nb, int64_t b,
                           int64_t j) {
  if constexpr (QT == kQ8_0) return static_cast<int8_t>(base[(b * rows + r) * 32 + j]);
  if (b < nb - nb % 2) {
    const uint8_t byte = base[(b / 2 * rows + r) * 32 + j];
    return (b & 1) ? byte >> 4 : byte & 0x0F;
  }
  const uint8_t byte = base[nb / 2 * rows * 32 + r * 16 + j % 16];  // the odd last block
  return j < 16 ? byte & 0x0F : byte >> 4;
}

#ifdef LQ_AVX2
constexpr int kGroup = 8;  // blocks whose scales are computed together
constexpr int64_t kPrefetch = 2048;  // bytes of qs requested ahead of use

template <int RW, int RX>
struct TileState {
  __m256 acc[RW][RX];
  float tail_min[RW][RX];  // Q4 min terms of a last group shorter than kGroup
  alignas(32) float scale[RW][RX][kGroup];  // d_w * d_x of the current group's blocks
};

// For blocks [b0, b0 + count): scale[r][c][j] = d_w[row r, b0 + j] * d_x[row c, b0 + j];
// the Q4 min terms m[r, b] * s_x[c, b] go into the accumulators' lanes (a short last group:
// into tail_min).
template <int64_t QT, int RW, int RX>
inline void group_scales(TileState<RW, RX>& t, const Weights& w, int64_t n0, const Acts& a,
                         int64_t m0, int64_t b0, int64_t count) {
  const auto f16x8 = [](const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  };
  if (count == kGroup) {
    __m256 dw[RW], mw[RW];
    for (int r = 0; r < RW; ++r) {
      dw[r] = f16x8(w.d + (n0 + r) * w.nb + b0);
      if constexpr (QT == kQ4_1) mw[r] = f16x8(w.m + (n0 + r) * w.nb + b0);
      if constexpr (QT == kQ4_0) mw[r] = _mm256_mul_ps(dw[r], _mm256_set1_ps(-8.0f));
    }
    for (int c = 0; c < RX; ++c) {
      const __m256 dx = _mm256_loadu_ps(a.d + (m0 + c) * a.nb + b0);
      for (int r = 0; r < RW; ++r) _mm256_store_ps(t.scale[r][c], _mm256_mul_ps(dw[r], dx));
      if constexpr (QT != kQ8_0) {
        const __m256 sx = _mm256_loadu_ps(a.s + (m0 + c) * a.nb + b0);
        for (int r = 0; r < RW; ++r) t.acc[r][c] = _mm256_fmadd_ps(mw[r], sx, t.acc[r][c]);
      }
    }
    return;
  }
  for (int r = 0; r < RW; ++r) {
    for (int c = 0; c < RX; ++c) {
      for (int64_t j = 0; j < count; ++j) {
        const int64_t wb = (n0 + r) * w.nb + b0 + j, xb = (m0 + c) * a.nb + b0 + j;
        const float dw = _cvtsh_ss(w.d[wb]);
        t.scale[r][c][j] = dw * a.d[xb];
        if constexpr (QT == kQ4_1) t.tail_min[r][c] += _cvtsh_ss(w.m[wb]) * a.s[xb];
        if constexpr (QT == kQ4_0) t.tail_min[r][c] += -8.0f * dw * a.s[xb];
      }
    }
  }
}

// acc[r][c] += scale[r][c][j] * (integer dot of weight block wu[r] with x block b of row c).
// For Q8_0, ws holds the signed weights (their signs move onto x; wu = |w|).
template <int64_t QT, int RW, int RX>
inline void block_dot(TileState<RW, RX>& t, const __m256i* wu, const __m256i* ws, const Acts& a,
                      int64_t m0, int64_t b, int64_t j) {
#pragma GCC unroll 8
  for (int c = 0; c < RX; ++c) {
    const __m256i xv =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q + (m0 + c) * a.k + b * kBlock));
#pragma GCC unroll 8
    for (int r = 0; r < RW; ++r) {
      const __m256i xs = QT == kQ8_0 ? _mm256_sign_epi8(xv, ws[r]) : xv;
      const __m256 p = _mm256_cvtepi32_ps(dot_u8s8(wu[r], xs));
      t.acc[r][c] = _mm256_fmadd_ps(_mm256_broadcast_ss(&t.scale[r][c][j]), p, t.acc[r][c]);
    }
  }
}

// Blocks [b0, b0 + count) of the RW weight rows at `base` against RX activation rows.
template <int64_t QT, int RW, int RX>
inline void group_dots(TileState<RW, RX>& t, const uint8_t* base, int64_t nb, const Acts& a,
                       int64_t m0, int64_t b0, int64_t count) {
  const auto unit = [base](int64_t u, int r) {  // 32-byte unit u of row r
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + (u * RW + r) * 32));
  };
  int64_t j = 0;
  if constexpr (QT == kQ8_0) {
    for (; j < count; ++j) {
      __m256i wu[RW], ws[RW];
#pragma GCC unroll 8
      for (int r = 0; r < RW; ++r) {
        ws[r] = unit(b0 + j, r);
        wu[r] = _mm256_sign_epi8(ws[r], ws[r]);
      }
      block_dot<QT, RW, RX>(t, wu, ws, a, m0, b0 + j, j);
    }
    return;
  }
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  for (; j + 2 <= count && b0 + j + 2 <= nb - nb % 2; j += 2) {  // a pair of blocks
    __m256i lo[RW], hi[RW];
#pragma GCC unroll 8
    for (int r = 0; r < RW; ++r) {
      const __m256i v = unit((b0 + j) / 2, r);
      lo[r] = _mm256_and_si256(v, low4);
      hi[r] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
    }
    block_dot<QT, RW, RX>(t, lo, lo, a, m0, b0 + j, j);
    block_dot<QT, RW, RX>(t, hi, hi, a, m0, b0 + j + 1, j + 1);
  }
  if (j < count) {  // the odd last block: 16 bytes per row after all pairs
    __m256i wu[RW];
    for (int r = 0; r < RW; ++r) wu[r] = unpack_q4(base + nb / 2 * RW * 32 + r * 16);
    block_dot<QT, RW, RX>(t, wu, wu, a, m0, b0 + j, j);
  }
}

// y[m0 + c, n0 + r] for r < RW weight rows and c < RX activation rows: each weight block is
// loaded and unpacked once for the RX activation rows. RW is kRows, or 1 for the last rows.
template <int64_t QT, int RW, int RX>
void tile(const Weights& w, int64_t n0, const Acts& a, int64_t m0, float* y, int64_t ldy) {
  const int64_t nb = w.nb;
  TileState<RW, RX> t;
  for (int r = 0; r < RW; ++r) {
    for (int c = 0; c < RX; ++c) {
      t.acc[r][c] = _mm256_setzero_ps();
      t.tail_min[r][c] = 0.0f;
    }
  }
  const uint8_t* base = group_base<QT>(w, n0);
  for (int64_t b0 = 0; b0 < nb; b0 += kGroup) {
    const int64_t count = std::min<int64_t>(kGroup, nb - b0);
    // Ask for the stream kPrefetch bytes ahead (past this tile's end it is the next tile).
    const uint8_t* ahead = base + b0 * RW * quant_bytes<QT>() + kPrefetch;
    for (int64_t off = 0; off < count * RW * quant_bytes<QT>(); off += 64)
      _mm_prefetch(reinterpret_cast<const char*>(ahead + off), _MM_HINT_T0);
    group_scales<QT, RW, RX>(t, w, n0, a, m0, b0, count);
    group_dots<QT, RW, RX>(t, base, nb, a, m0, b0, count);
  }
  for (int r = 0; r < RW; ++r)
    for (int c = 0; c < RX; ++c)
      y[(m0 + c) * ldy + n0 + r] = hsum(t.acc[r][c]) + t.tail_min[r][c];
}
#else
// The Q4 min term of output row n against activation row i: sum_b m[n,b] * s[i,b].
template <int64_t QT>
float min_term(const Weights& w, int64_t n, const Acts& a, int64_t i) {
  float sum = 0.0f;
  for (int64_t b = 0; b < w.nb; ++b) {
    const int64_t wb = n * w.nb + b;
    const float m = QT == kQ4_1 ? f16_to_f32(w.m[wb]) : -8.0f * f16_to_f32(w.d[wb]);
    sum += m * a.s[i * a.nb + b];
  }
  return QT == kQ8_0 ? 0.0f : sum;
}

// Portable tile: the same arithmetic, one (row, row) pair at a time.
template <int64_t QT, int RW, int RX>
void tile(const Weights& w, int64_t n0, const Acts& a, int64_t m0, float* y, int64_t ldy) {
  const uint8_t* base = group_base<QT>(w, n0);
  for (int r = 0; r < RW; ++r) {
    const uint16_t* wd = w.d + (n0 + r) * w.nb;
    for (int c = 0; c < RX; ++c) {
      const int8_t* xq = a.q + (m0 + c) * a.k;
      float acc = 0.0f;
      for (int64_t b = 0; b < w.nb; ++b) {
        int32_t isum = 0;
        for (int64_t j = 0; j < kBlock; ++j)
          isum += quant_value<QT>(base, RW, r, w.nb, b, j) * xq[b * kBlock + j];
        acc += f16_to_f32(wd[b]) * a.d[(m0 + c) * w.nb + b] * static_cast<float>(isum);
      }
      y[(m0 + c) * ldy + n0 + r] = acc + min_term<QT>(w, n0 + r, a, m0 + c);
    }
  }
}
#endif

// Weight rows [n0, n0 + RW) against all M activation rows, RX rows at a time.
template <int64_t QT, int RW, int RX>
void row_group(const Weights& w, int64_t n0, const Acts& a, int64_t num_rows, float* y) {
  int64_t m0 = 0;
  for (; m0 + RX <= num_rows; m0 += RX) tile<QT, RW, RX>(w, n0, a, m0, y, w.n);
  switch (num_rows - m0) {  // the last few activation rows
    case 3: tile<QT, RW, 3>(w, n0, a, m0, y, w.n); break;
    case 2: tile<QT, RW, 2>(w, n0, a, m0, y, w.n); break;
    case 1: tile<QT, RW, 1>(w, n0, a, m0, y, w.n); break;
    default: break;
  }
}

// Split the output rows over torch's intra-op threads in groups of kRows rows.
template <int64_t QT, int RX>
void gemm_rows(const Weights& w, const Acts& a, int64_t num_rows, float* y) {
  const int64_t num_groups = (w.n + kRows - 1) / kRows;
  // Enough work per task to pay for waking a thread (~2-3 us): ~192K multiply-adds, so
  // SmolLM2's k/v (192 x 576) run on one thread and its q/o (576 x 576) on two.
  const int64_t grain = std::max<int64_t>(1, (192 << 10) / (kRows * a.k * num_rows));
  at::parallel_for(0, num_groups, grain, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t n0 = g * kRows;
      if (n0 + kRows <= w.n) {
        row_group<QT, kRows, RX>(w, n0, a, num_rows, y);
      } else {
        for (int64_t n = n0; n < w.n; ++n) row_group<QT, 1, RX>(w, n, a, num_rows, y);
      }
    }
  });
}

template <int64_t QT>
void gemm(const Weights& w, const Acts& a, int64_t num_rows, float* y) {
  // Decode (M = 1..3): one tile per 4 weight rows. Prefill: also 4 activation rows per tile
  // where AVX-512 gives 32 vector registers for the 16 accumulators, else 2.
#if defined(__AVX512VL__)
  constexpr int prefill_rows = 4;
#else
  constexpr int prefill_rows = 2;
#endif
  switch (num_rows) {
    case 1: gemm_rows<QT, 1>(w, a, num_rows, y); break;
    case 2: gemm_rows<QT, 2>(w, a, num_rows, y); break;
    case 3: gemm_rows<QT, 3>(w, a, num_rows, y); break;
    default: gemm_rows<QT, prefill_rows>(w, a, num_rows, y); break;
  }
}

struct QuantizedRows {
  at::Tensor q, d, s;
};

QuantizedRows quantize_rows_impl(const at::Tensor& x) {
  const int64_t num_rows = x.size(0), k = x.size(1), nb = k / kBlock;
  QuantizedRows out{at::empty({num_rows, k}, x.options().dtype(at::kChar)),
                    at::empty({num_rows, nb}, x.options()), at::empty({num_rows, nb}, x.options())};
  const float* xp = x.const_data_ptr<float>();
  int8_t* qp = out.q.mutable_data_ptr<int8_t>();
  float* dp = out.d.mutable_data_ptr<float>();
  float* sp = out.s.mutable_data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / k);
  at::parallel_for(0, num_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      quantize_row(xp + i * k, nb, qp + i * k, dp + i * nb, sp + i * nb);
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
               xq.s.const_data_ptr<float>(), x.size(1), w.nb};
  float* yp = y.mutable_data_ptr<float>();
  if (qtype == kQ8_0) gemm<kQ8_0>(w, a, num_rows, yp);
  else if (qtype == kQ4_0) gemm<kQ4_0>(w, a, num_rows, yp);
  else gemm<kQ4_1>(w, a, num_rows, yp);
  return y;
}

std::string isa() {
#if defined(LQ_VNNI)
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
