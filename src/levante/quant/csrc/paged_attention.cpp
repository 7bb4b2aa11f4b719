// Paged attention on CPU: a step's new query tokens attend to their sequences' cached contexts,
// read in place from the paged K/V pool (no gather into a padded batch). One code path serves
// decode (one query per sequence), prefill chunks and draft verification (several per sequence).
//
// Shapes (q and out float32, the index tensors int64, all contiguous):
//   q            [T, H, D]                          the step's new tokens, sequence by sequence
//   k/v_cache    [num_blocks * block_size, KV, D]   one layer's pool, a row per slot: float32,
//                                                   bfloat16, float16 or int8 (q8_0, below)
//   k/v_scales   [num_blocks * block_size, KV, D/32] float16, q8_0 caches only: value j of a
//                                                   row is cache[j] * scales[j / 32], as
//                                                   llama.cpp's q8_0 KV cache
//   block_tables [B, max_blocks]                    block ids; entries past a context unused
//   context_lens [B]                                keys of each sequence, its new ones included
//   query_lens   [B]                                new tokens of each sequence (1 .. context)
//   out          [T, H, D]
// Query i of sequence b (context L, Q new tokens) sits at position L - Q + i and attends to keys
// 0 .. L - Q + i (causal within the chunk). Key t of sequence b sits in slot
// block_tables[b][t / block_size] * block_size + t % block_size, and query head h reads KV head
// h / G with G = H / KV (GQA):
//   scores[h, t] = scale * q[h] . k[slot(t), h / G]
//   out[h] = sum_t softmax_t(scores[h])[t] * v[slot(t), h / G]
// The softmax subtracts each row's max before exp and runs in float32.
//
// Batch invariance: a query's result is bit-identical to the one-query decode of that token
// with context = its position + 1, whatever else the step holds (neighbours, a chunk of 1 or
// 500, a prefix-cache hit, draft tokens after it). Everything a query's numbers go through is a
// function of that query alone: its tasks (runs of kTaskTokens keys, fixed boundaries), each
// key's dot product (8 float lanes accumulated in head-dim order, then one fixed horizontal
// sum, whether the key is computed in a group of 4 or alone), the softmax of each task, the
// weighted sum of V rows in key order, and the merge of its tasks in task order. With 8-bit
// activations downstream, float noise from another chunking flipped near-tie greedy tokens.
// A 16-bit or 8-bit cache is widened to float32 block by block as it is read (exactly: every
// bf16/f16 value and every q * d is a float32), so the arithmetic is the float32 cache's.
//
// Work is split by tokens, not heads (as flash-decoding does): a task is a run of whole blocks of
// one sequence, all heads at once, so it streams each block's K and V rows as one contiguous
// [block_size, KV, D] stretch, and one long sequence still splits evenly over the threads
// (SmolLM2 has 3 KV heads: one task per (sequence, KV head) left one of 2 threads idle a third
// of the time). A work item is one task of a tile: up to kTileQueries consecutive queries of a
// sequence, so each K/V row loaded feeds every query head of the tile that reads its KV head
// (kMaxRows of them in registers at once; on one core this runs 75-85 GFLOPS, SDPA's masked
// prefill 40). Workers take items one at a time. Each (query, task) keeps its own softmax max
// m, sum l and unnormalised output o per head; a query's tasks then merge:
//   M = max_c m_c,  out = sum_c exp(m_c - M) o_c / sum_c exp(m_c - M) l_c.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Half.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

// How the K/V cache stores a value (see the top of the file).
enum class KVKind { kF32, kBF16, kF16, kQ8_0 };
constexpr int64_t kQ8Block = 32;  // values per q8_0 scale

struct Problem {
  const float* q;
  const void* k;
  const void* v;
  const c10::Half* k_scales;  // q8_0 only, else null
  const c10::Half* v_scales;
  KVKind kv;
  const int64_t* tables;
  int64_t num_heads, num_kv_heads, head_dim, max_blocks, block_size;
  float scale;
};

// Consecutive queries of sequence seq: rows [first_row, first_row + num_queries) of q, at
// positions first_pos, first_pos + 1, ...
struct Tile {
  int64_t seq, first_row, num_queries, first_pos;
};

// Queries per tile: enough that a K/V block, once in L1, serves many query rows; few enough that
// the causal edge (keys computed for the tile's last query that its first does not attend) and
// the scores scratch (kTileQueries * H * task tokens floats) stay small.
constexpr int64_t kTileQueries = 8;

#if defined(__AVX2__) && defined(__FMA__)
#define LPA_AVX2 1
#include <immintrin.h>

// Query rows computed together by the microkernels: 4 keys x kMaxRows accumulators plus the
// loads must fit the vector registers (32 with AVX-512VL, 16 with AVX2 alone). The row count
// changes which registers hold what, never a row's arithmetic.
#if defined(__AVX512VL__)
constexpr int kMaxRows = 6;
#else
constexpr int kMaxRows = 2;
#endif

// fn(std::integral_constant<int, rows>{}) for rows in R .. kMaxRows: a microkernel per count.
template <int R = 1, typename Fn>
inline void with_rows(int64_t rows, Fn&& fn) {
  if constexpr (R < kMaxRows) {
    if (rows != R) return with_rows<R + 1>(rows, fn);
  }
  fn(std::integral_constant<int, R>{});
}

// The sums of four vectors' lanes: [sum(a), sum(b), sum(c), sum(d)], each as
// ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7)) whatever the other three are.
inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

inline float hsum(__m256 a) {
  const __m128 t = hsum4(a, a, a, a);
  return _mm_cvtss_f32(t);
}

// exp(x) for x <= 0, Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2, e^r by a degree-7
// polynomial, times 2^n built in the exponent bits. Relative error <= 1.2e-7 over [-87, 0]
// (checked against double exp); x below -87.3, where 2^n would leave the normal range, gives
// exp(-87.3) ~ 1e-38, not 0. libm's scalar expf took ~35% of the kernel's time.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}

// s[r][0..4) = scale * q[r] . k rows 0..4, for R query rows that read the same KV head: each
// K load feeds R FMAs, and 4 * R chains run side by side.
template <int R>
inline void score_keys4(const float* const* q, const float* k, int64_t stride, int64_t d,
                        float scale, float* const* s) {
  __m256 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm256_setzero_ps();
  for (int64_t j = 0; j < d; j += 8) {
    __m256 rows[4];
    for (int c = 0; c < 4; ++c) rows[c] = _mm256_loadu_ps(k + c * stride + j);
    for (int r = 0; r < R; ++r) {
      const __m256 x = _mm256_loadu_ps(q[r] + j);
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm256_fmadd_ps(x, rows[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    _mm_storeu_ps(s[r], _mm_mul_ps(hsum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]),
                                   _mm_set1_ps(scale)));
}

// s[r][0] = scale * q[r] . k for one key: the same lanes, order and sum as score_keys4.
template <int R>
inline void score_key1(const float* const* q, const float* k, int64_t d, float scale,
                       float* const* s) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t j = 0; j < d; j += 8) {
    const __m256 row = _mm256_loadu_ps(k + j);
    for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(q[r] + j), row, acc[r]);
  }
  for (int r = 0; r < R; ++r) s[r][0] = hsum(acc[r]) * scale;
}

// o[r][0..32) += sum_i w[r][i] * v_i[0..32) over n rows in order, for R query rows reading the
// same KV head: each V load feeds R FMAs.
template <int R>
inline void accumulate_cols32(const float* const* w, const float* v, int64_t stride, int64_t n,
                              float* const* o) {
  __m256 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm256_loadu_ps(o[r] + 8 * c);
  for (int64_t i = 0; i < n; ++i, v += stride) {
    __m256 cols[4];
    for (int c = 0; c < 4; ++c) cols[c] = _mm256_loadu_ps(v + 8 * c);
    for (int r = 0; r < R; ++r) {
      const __m256 x = _mm256_set1_ps(w[r][i]);
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm256_fmadd_ps(x, cols[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) _mm256_storeu_ps(o[r] + 8 * c, acc[r][c]);
}
#endif

// s[r][i] = scale * q[r] . k_i for num_rows query rows [D] and n keys of one KV head, key i at
// k + i * stride.
void score_rows(const float* const* q, float* const* s, int64_t num_rows, const float* k,
                int64_t stride, int64_t n, int64_t d, float scale) {
#ifdef LPA_AVX2
  if (d % 8 == 0) {
    for (int64_t r0 = 0; r0 < num_rows; r0 += kMaxRows) {
      with_rows(std::min<int64_t>(kMaxRows, num_rows - r0), [&](auto rows) {
        constexpr int R = decltype(rows)::value;
        float* out[R];
        int64_t i = 0;
        for (; i + 4 <= n; i += 4) {
          for (int r = 0; r < R; ++r) out[r] = s[r0 + r] + i;
          score_keys4<R>(q + r0, k + i * stride, stride, d, scale, out);
        }
        for (; i < n; ++i) {
          for (int r = 0; r < R; ++r) out[r] = s[r0 + r] + i;
          score_key1<R>(q + r0, k + i * stride, d, scale, out);
        }
      });
    }
    return;
  }
#endif
  for (int64_t r = 0; r < num_rows; ++r) {
    for (int64_t i = 0; i < n; ++i) {
      const float* ki = k + i * stride;
      float acc = 0.0f;
      for (int64_t j = 0; j < d; ++j) acc += q[r][j] * ki[j];
      s[r][i] = scale * acc;
    }
  }
}

// o[r] += sum_i w[r][i] * v_i for num_rows rows and n values of one KV head (as score_rows).
void accumulate_rows(const float* const* w, float* const* o, int64_t num_rows, const float* v,
                     int64_t stride, int64_t n, int64_t d) {
  int64_t j0 = 0;
#ifdef LPA_AVX2
  for (; j0 + 32 <= d; j0 += 32) {
    for (int64_t r0 = 0; r0 < num_rows; r0 += kMaxRows) {
      with_rows(std::min<int64_t>(kMaxRows, num_rows - r0), [&](auto rows) {
        constexpr int R = decltype(rows)::value;
        float* out[R];
        for (int r = 0; r < R; ++r) out[r] = o[r0 + r] + j0;
        accumulate_cols32<R>(w + r0, v + j0, stride, n, out);
      });
    }
  }
#endif
  for (int64_t r = 0; r < num_rows; ++r)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = j0; j < d; ++j) o[r][j] += w[r][i] * v[i * stride + j];
}

// s[t] = exp(s[t] - max_t s) in place; also gives that max and the new sum (>= 1).
void exp_shifted(float* s, int64_t n, float* max_out, float* sum_out) {
  float top = -std::numeric_limits<float>::infinity();
  int64_t t = 0;
#ifdef LPA_AVX2
  __m256 tops = _mm256_set1_ps(top);
  for (; t + 8 <= n; t += 8) tops = _mm256_max_ps(tops, _mm256_loadu_ps(s + t));
  const __m128 half = _mm_max_ps(_mm256_castps256_ps128(tops), _mm256_extractf128_ps(tops, 1));
  float lanes[4];
  _mm_storeu_ps(lanes, half);
  top = std::max(std::max(lanes[0], lanes[1]), std::max(lanes[2], lanes[3]));
#endif
  for (; t < n; ++t) top = std::max(top, s[t]);
  float sum = 0.0f;
  t = 0;
#ifdef LPA_AVX2
  __m256 sums = _mm256_setzero_ps();
  const __m256 shift = _mm256_set1_ps(top);
  for (; t + 8 <= n; t += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), shift));
    _mm256_storeu_ps(s + t, e);
    sums = _mm256_add_ps(sums, e);
  }
  sum = hsum(sums);
#endif
  for (; t < n; ++t) {
    s[t] = std::exp(s[t] - top);
    sum += s[t];
  }
  *max_out = top;
  *sum_out = sum;
}

// Asks for the next block while this one computes: blocks sit anywhere in the pool, where the
// hardware prefetcher does not follow (without it, K/V not in cache took 2.4x as long).
inline void prefetch_rows(const void* rows, int64_t num_bytes) {
  const char* bytes = static_cast<const char*>(rows);
  for (int64_t i = 0; i < num_bytes; i += 64) __builtin_prefetch(bytes + i);
}

inline int64_t kv_element_bytes(KVKind kind) {
  return kind == KVKind::kF32 ? 4 : kind == KVKind::kQ8_0 ? 1 : 2;
}

// out[i] = value i of `cache` from element `first` on, as float32 (exact), for i < count.
void widen(KVKind kind, const void* cache, const c10::Half* scales, int64_t first, int64_t count,
           float* out) {
  if (kind == KVKind::kBF16) {
    const uint16_t* in = static_cast<const uint16_t*>(cache) + first;
    for (int64_t i = 0; i < count; ++i) {  // a bfloat16 is the top half of its float32
      const uint32_t bits = static_cast<uint32_t>(in[i]) << 16;
      std::memcpy(out + i, &bits, sizeof(float));
    }
  } else if (kind == KVKind::kF16) {
    const c10::Half* in = static_cast<const c10::Half*>(cache) + first;
    int64_t i = 0;
#if defined(__F16C__) && defined(LPA_AVX2)
    for (; i + 8 <= count; i += 8)
      _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(
                                    reinterpret_cast<const __m128i*>(in + i))));
#endif
    for (; i < count; ++i) out[i] = static_cast<float>(in[i]);
  } else {  // q8_0: rows are whole 32-value blocks, so `first` and `count` are too
    const int8_t* in = static_cast<const int8_t*>(cache) + first;
    const c10::Half* d = scales + first / kQ8Block;
    for (int64_t b = 0; b < count / kQ8Block; ++b) {
      const float scale = static_cast<float>(d[b]);
      for (int64_t j = 0; j < kQ8Block; ++j)
        out[b * kQ8Block + j] = static_cast<float>(in[b * kQ8Block + j]) * scale;
    }
  }
}

// Per (query, task), one after the other: max [H], sum [H], unnormalised out [H, D].
inline int64_t partial_floats(const Problem& p) { return p.num_heads * (p.head_dim + 2); }

// Per-thread scratch of one work item.
struct Scratch {
  std::vector<float> scores;        // [kTileQueries, H, task_len]
  std::vector<const float*> rows;   // query rows (or weight rows) of one KV head
  std::vector<float*> outs;         // their scores (or outputs)
  std::vector<float> block;         // one K or V block widened to float32 (16-/8-bit caches)

  void reserve(int64_t num_heads, int64_t task_len, int64_t block_floats) {
    const auto num_rows = static_cast<size_t>(kTileQueries * num_heads);
    if (scores.size() < num_rows * task_len) scores.resize(num_rows * task_len);
    if (block.size() < static_cast<size_t>(block_floats)) block.resize(block_floats);
    if (rows.size() < num_rows) rows.resize(num_rows);
    if (outs.size() < num_rows) outs.resize(num_rows);
  }
};

// Task `first_block / task_blocks` of every query of `tile` whose context reaches it: that
// query's keys [start, min(start + task_len, pos + 1)). parts[i] is query i's partial for it.
void attend_tile_task(const Problem& p, const Tile& tile, int64_t first_block, int64_t task_blocks,
                      float* const* parts, Scratch& scratch) {
  const int64_t d = p.head_dim, num_heads = p.num_heads, group = p.num_heads / p.num_kv_heads;
  const int64_t stride = p.num_kv_heads * d;  // floats from one slot to the next
  const int64_t bs = p.block_size, task_len = task_blocks * bs;
  const int64_t* table = p.tables + tile.seq * p.max_blocks;
  const int64_t start = first_block * bs;
  auto len_of = [&](int64_t i) {  // keys of this task that query i attends to (<= 0: none)
    return std::min(start + task_len, tile.first_pos + i + 1) - start;
  };
  const int64_t first = std::max<int64_t>(0, start - tile.first_pos);  // first query reaching it
  const int64_t last_len = len_of(tile.num_queries - 1);
  const int64_t element = kv_element_bytes(p.kv);
  auto first_value = [&](int64_t t0) {  // of the block holding key start + t0, in the cache
    return table[first_block + t0 / bs] * bs * stride;
  };
  auto block_bytes = [&](const void* cache, int64_t t0) {
    return static_cast<const char*>(cache) + first_value(t0) * element;
  };
  // The first n rows of that block as float32: in place, or widened into scratch.block.
  auto block_rows = [&](const void* cache, const c10::Half* scales, int64_t t0,
                        int64_t n) -> const float* {
    if (p.kv == KVKind::kF32) return static_cast<const float*>(cache) + first_value(t0);
    widen(p.kv, cache, scales, first_value(t0), n * stride, scratch.block.data());
    return scratch.block.data();
  };
  auto score_row = [&](int64_t i, int64_t h) {
    return scratch.scores.data() + (i * num_heads + h) * task_len;
  };

  // Pass 1: scores[i, h, t], block by block (a block's rows are consecutive slots). Keys past a
  // query's own are computed for the tile's last query and left unused by the others.
  prefetch_rows(block_bytes(p.k, 0), std::min(bs, last_len) * stride * element);
  for (int64_t t0 = 0; t0 < last_len; t0 += bs) {
    const int64_t n = std::min(bs, last_len - t0);
    if (t0 + bs < last_len)
      prefetch_rows(block_bytes(p.k, t0 + bs), std::min(bs, last_len - t0 - bs) * stride * element);
    else
      prefetch_rows(block_bytes(p.v, 0), std::min(bs, last_len) * stride * element);
    const float* keys = block_rows(p.k, p.k_scales, t0, n);
    for (int64_t kv = 0; kv < p.num_kv_heads; ++kv) {
      int64_t num_rows = 0;
      for (int64_t i = first; i < tile.num_queries; ++i)
        for (int64_t h = kv * group; h < (kv + 1) * group; ++h, ++num_rows) {
          scratch.rows[num_rows] = p.q + ((tile.first_row + i) * num_heads + h) * d;
          scratch.outs[num_rows] = score_row(i, h) + t0;
        }
      score_rows(scratch.rows.data(), scratch.outs.data(), num_rows, keys + kv * d, stride, n,
                 d, p.scale);
    }
  }
  for (int64_t i = first; i < tile.num_queries; ++i) {
    float* part = parts[i];
    for (int64_t h = 0; h < num_heads; ++h)
      exp_shifted(score_row(i, h), len_of(i), part + h, part + num_heads + h);
    std::fill(part + 2 * num_heads, part + num_heads * (d + 2), 0.0f);
  }
  // Pass 2: out[i, h] = sum_t exp(scores[i, h, t] - max) * v[t]: the keys every query of the
  // tile attends to for all of them at once, then each query's remaining keys on its own.
  for (int64_t t0 = 0; t0 < last_len; t0 += bs) {
    const int64_t n = std::min(bs, last_len - t0);
    if (t0 + bs < last_len)
      prefetch_rows(block_bytes(p.v, t0 + bs), std::min(bs, last_len - t0 - bs) * stride * element);
    const float* values = block_rows(p.v, p.v_scales, t0, n);
    auto accumulate = [&](int64_t i0, int64_t i1, int64_t key0, int64_t key1) {  // queries, keys
      for (int64_t kv = 0; kv < p.num_kv_heads; ++kv) {
        int64_t num_rows = 0;
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t h = kv * group; h < (kv + 1) * group; ++h, ++num_rows) {
            scratch.rows[num_rows] = score_row(i, h) + t0 + key0;
            scratch.outs[num_rows] = parts[i] + 2 * num_heads + h * d;
          }
        accumulate_rows(scratch.rows.data(), scratch.outs.data(), num_rows,
                        values + key0 * stride + kv * d, stride, key1 - key0, d);
      }
    };
    auto keys_in_block = [&](int64_t i) { return std::clamp<int64_t>(len_of(i) - t0, 0, n); };
    const int64_t shared = keys_in_block(first);  // the first query has the fewest
    if (shared > 0) accumulate(first, tile.num_queries, 0, shared);
    for (int64_t i = first; i < tile.num_queries; ++i)
      if (keys_in_block(i) > shared) accumulate(i, i + 1, shared, keys_in_block(i));
  }
}

// out[h] of one query from its tasks' partials (see the top of the file).
void merge(const float* parts, int64_t num_parts, int64_t num_heads, int64_t d, float* out) {
  const int64_t size = num_heads * (d + 2);
  for (int64_t h = 0; h < num_heads; ++h) {
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t c = 0; c < num_parts; ++c) top = std::max(top, parts[c * size + h]);
    float total = 0.0f;
    std::fill(out + h * d, out + (h + 1) * d, 0.0f);
    for (int64_t c = 0; c < num_parts; ++c) {
      const float* part = parts + c * size;
      const float weight = std::exp(part[h] - top);
      total += weight * part[num_heads + h];
      const float* o = part + 2 * num_heads + h * d;
      for (int64_t j = 0; j < d; ++j) out[h * d + j] += weight * o[j];
    }
    const float inverse = 1.0f / total;  // total >= 1: the top task's sum counts exp(0)
    for (int64_t j = 0; j < d; ++j) out[h * d + j] *= inverse;
  }
}

// Tokens per task, rounded up to whole blocks. Fixed, so a query's result depends on neither
// the batch nor the thread count; short enough that one sequence of a few hundred tokens splits
// over a few threads, long enough that the merge costs next to nothing.
constexpr int64_t kTaskTokens = 128;
// Partials held at once (floats, 8 MiB): a long chunk deep into a long context (512 queries x
// 256 tasks x Mistral Small's 32 heads) runs in groups of tiles instead of needing gigabytes.
constexpr int64_t kMaxPartialFloats = int64_t{1} << 21;

// out [T, H, D] for the tiles, which cover q's rows in order.
void attend(const Problem& p, const std::vector<Tile>& tiles, float* out) {
  const int64_t bs = p.block_size, d = p.head_dim, num_heads = p.num_heads;
  const int64_t task_blocks = (kTaskTokens + bs - 1) / bs, task_len = task_blocks * bs;
  const int64_t size = partial_floats(p);
  auto num_tasks = [&](int64_t pos) {  // of the query at pos: its pos + 1 keys' blocks in tasks
    return ((pos + bs) / bs + task_blocks - 1) / task_blocks;
  };
  // A task of one query is ~2 * H * len * D multiply-adds; waking a thread (~2-3 us) pays from
  // ~64K.
  const int64_t work_per_task = 2 * num_heads * task_len * d;
  // Kept from call to call (one per calling thread, at most kMaxPartialFloats): a fresh buffer
  // each call page-faulted (~2 us per 4 KiB), a quarter of the time on a 2000-token prompt.
  thread_local std::vector<float> partials;
  std::vector<int64_t> first_part;  // per row of the group: index of its task 0's partial
  std::vector<std::pair<int64_t, int64_t>> items;  // (tile, task)
  for (size_t g0 = 0, g1 = 0; g0 < tiles.size(); g0 = g1) {
    const int64_t row0 = tiles[g0].first_row;
    int64_t count = 0;
    first_part.clear();
    items.clear();
    for (; g1 < tiles.size(); ++g1) {
      const Tile& tile = tiles[g1];
      int64_t tile_count = 0;
      for (int64_t i = 0; i < tile.num_queries; ++i) tile_count += num_tasks(tile.first_pos + i);
      if (g1 > g0 && (count + tile_count) * size > kMaxPartialFloats) break;
      for (int64_t i = 0; i < tile.num_queries; ++i) {
        first_part.push_back(count);
        count += num_tasks(tile.first_pos + i);
      }
      for (int64_t c = 0; c < num_tasks(tile.first_pos + tile.num_queries - 1); ++c)
        items.emplace_back(g1, c);
    }
    if (static_cast<int64_t>(partials.size()) < count * size) partials.resize(count * size);
    float* const base = partials.data();  // the workers' own `partials` are other vectors
    // Items differ in cost (a decode row's task is an eighth of a full tile's, a causal edge's
    // less, and a worker may lose its core to another process): each worker takes the next
    // item left, not a fixed share. Which worker computes an item never changes its numbers.
    const int64_t num_items = static_cast<int64_t>(items.size());
    const int64_t num_workers = std::clamp<int64_t>(
        count * work_per_task / (64 << 10), 1, std::min<int64_t>(at::get_num_threads(), num_items));
    std::atomic<int64_t> next{0};
    at::parallel_for(0, num_workers, 1, [&](int64_t, int64_t) {
      thread_local Scratch scratch;  // per worker thread, kept (as the partials)
      scratch.reserve(num_heads, task_len,
                      p.kv == KVKind::kF32 ? 0 : bs * p.num_kv_heads * p.head_dim);
      float* parts[kTileQueries];
      for (int64_t item; (item = next.fetch_add(1, std::memory_order_relaxed)) < num_items;) {
        const auto [t, c] = items[item];
        const Tile& tile = tiles[t];
        for (int64_t i = 0; i < tile.num_queries; ++i)
          parts[i] = base + (first_part[tile.first_row - row0 + i] + c) * size;
        attend_tile_task(p, tile, c * task_blocks, task_blocks, parts, scratch);
      }
    });
    const int64_t num_rows = static_cast<int64_t>(first_part.size());
    at::parallel_for(0, num_rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t parts_end = r + 1 < num_rows ? first_part[r + 1] : count;
        merge(base + first_part[r] * size, parts_end - first_part[r], num_heads, d,
              out + (row0 + r) * num_heads * d);
      }
    });
  }
}

// num_seqs: B, as q (decode) or query_lens says.
void check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k_cache,
                  const at::Tensor& v_cache, const at::Tensor& block_tables,
                  const at::Tensor& context_lens, int64_t block_size, int64_t num_seqs) {
  for (const at::Tensor* t : {&q, &k_cache, &v_cache, &block_tables, &context_lens})
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), op,
                " takes contiguous CPU tensors, got one on ", t->device(),
                t->is_contiguous() ? "" : " (not contiguous)");
  TORCH_CHECK(q.scalar_type() == at::kFloat, "q must be float32, got ", q.scalar_type());
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "k_cache and v_cache must share a "
              "dtype, got ", k_cache.scalar_type(), " and ", v_cache.scalar_type());
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "block_tables and context_lens must be int64, got ", block_tables.scalar_type(),
              ", ", context_lens.scalar_type());
  TORCH_CHECK(q.dim() == 3, "q must be [tokens, H, D], got ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.sizes() == v_cache.sizes(),
              "k_cache and v_cache must both be [slots, KV, D], got ", k_cache.sizes(), " and ",
              v_cache.sizes());
  TORCH_CHECK(block_size > 0 && k_cache.size(0) % block_size == 0, "the caches' ",
              k_cache.size(0), " slots are not whole blocks of ", block_size);
  const int64_t num_heads = q.size(1), num_kv_heads = k_cache.size(1);
  TORCH_CHECK(q.size(2) == k_cache.size(2), "q has head_dim ", q.size(2), ", the cache ",
              k_cache.size(2));
  TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "q's ", num_heads,
              " heads are not a multiple of the cache's ", num_kv_heads, " KV heads");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == num_seqs,
              "block_tables must be [", num_seqs, ", max_blocks], got ", block_tables.sizes());
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.size(0) == num_seqs,
              "context_lens must be [", num_seqs, "], got ", context_lens.sizes());
}

// Every context fits its table, and every block it reads is in the pool.
void check_tables(const at::Tensor& block_tables, const at::Tensor& context_lens,
                  int64_t block_size, int64_t num_blocks) {
  const int64_t max_blocks = block_tables.size(1);
  const int64_t* tables = block_tables.const_data_ptr<int64_t>();
  const int64_t* lens = context_lens.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < block_tables.size(0); ++b) {
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= max_blocks * block_size, "sequence ", b,
                " has context length ", lens[b], "; its table holds 1 to ",
                max_blocks * block_size, " tokens (", max_blocks, " blocks of ", block_size, ")");
    for (int64_t i = 0; i < (lens[b] + block_size - 1) / block_size; ++i) {
      const int64_t block = tables[b * max_blocks + i];
      TORCH_CHECK(block >= 0 && block < num_blocks, "sequence ", b, " names block ", block,
                  " at table entry ", i, "; the cache has blocks 0 to ", num_blocks - 1);
    }
  }
}

// Each sequence's queries in tiles of up to kTileQueries, in row order.
std::vector<Tile> tile_queries(const int64_t* context_lens, const int64_t* query_lens,
                               int64_t num_seqs) {
  std::vector<Tile> tiles;
  for (int64_t b = 0, row = 0; b < num_seqs; row += query_lens[b], ++b) {
    const int64_t first_pos = context_lens[b] - query_lens[b];
    for (int64_t i = 0; i < query_lens[b]; i += kTileQueries)
      tiles.push_back({b, row + i, std::min(kTileQueries, query_lens[b] - i), first_pos + i});
  }
  return tiles;
}

// The cache's storage kind; q8_0 (int8) needs float16 scales [slots, KV, D / 32] for K and V.
KVKind kv_kind(const at::Tensor& k_cache, const std::optional<at::Tensor>& k_scales,
               const std::optional<at::Tensor>& v_scales) {
  switch (k_cache.scalar_type()) {
    case at::kFloat: return KVKind::kF32;
    case at::kBFloat16: return KVKind::kBF16;
    case at::kHalf: return KVKind::kF16;
    case at::kChar: {
      TORCH_CHECK(k_scales.has_value() && v_scales.has_value(),
                  "an int8 (q8_0) cache needs k_scales and v_scales");
      TORCH_CHECK(k_cache.size(2) % kQ8Block == 0, "q8_0 rows must be whole blocks of ",
                  kQ8Block, ", head_dim is ", k_cache.size(2));
      for (const at::Tensor* t : {&*k_scales, &*v_scales})
        TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == at::kHalf &&
                        t->dim() == 3 && t->size(0) == k_cache.size(0) &&
                        t->size(1) == k_cache.size(1) && t->size(2) == k_cache.size(2) / kQ8Block,
                    "q8_0 scales must be contiguous CPU float16 [slots, KV, D / 32], got ",
                    t->scalar_type(), " ", t->sizes());
      return KVKind::kQ8_0;
    }
    default:
      TORCH_CHECK(false, "k_cache and v_cache must be float32, bfloat16, float16 or int8 (q8_0), "
                  "got ", k_cache.scalar_type());
  }
}

at::Tensor run(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
               const std::optional<at::Tensor>& k_scales,
               const std::optional<at::Tensor>& v_scales, const at::Tensor& block_tables,
               const std::vector<Tile>& tiles, int64_t block_size, double scale) {
  at::Tensor out = at::empty(q.sizes(), q.options());
  const KVKind kind = kv_kind(k_cache, k_scales, v_scales);
  const bool q8 = kind == KVKind::kQ8_0;
  const Problem p{q.const_data_ptr<float>(), k_cache.const_data_ptr(), v_cache.const_data_ptr(),
                  q8 ? k_scales->const_data_ptr<c10::Half>() : nullptr,
                  q8 ? v_scales->const_data_ptr<c10::Half>() : nullptr, kind,
                  block_tables.const_data_ptr<int64_t>(),
                  q.size(1), k_cache.size(1), q.size(2), block_tables.size(1), block_size,
                  static_cast<float>(scale)};
  attend(p, tiles, out.mutable_data_ptr<float>());
  return out;
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& block_tables,
                           const at::Tensor& context_lens, const at::Tensor& query_lens,
                           int64_t block_size, double scale,
                           const std::optional<at::Tensor>& k_scales,
                           const std::optional<at::Tensor>& v_scales) {
  TORCH_CHECK(query_lens.device().is_cpu() && query_lens.is_contiguous() &&
                  query_lens.scalar_type() == at::kLong && query_lens.dim() == 1,
              "query_lens must be a contiguous CPU int64 [B], got ", query_lens.scalar_type(),
              " ", query_lens.sizes(), " on ", query_lens.device());
  const int64_t num_seqs = query_lens.size(0);
  check_inputs("paged_attention", q, k_cache, v_cache, block_tables, context_lens, block_size,
               num_seqs);
  check_tables(block_tables, context_lens, block_size, k_cache.size(0) / block_size);
  const int64_t* lens = context_lens.const_data_ptr<int64_t>();
  const int64_t* qlens = query_lens.const_data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t b = 0; b < num_seqs; ++b) {
    TORCH_CHECK(qlens[b] >= 1 && qlens[b] <= lens[b], "sequence ", b, " has query length ",
                qlens[b], "; it must be 1 to its context length ", lens[b]);
    total += qlens[b];
  }
  TORCH_CHECK(total == q.size(0), "q has ", q.size(0), " tokens, query_lens add up to ", total);
  return run(q, k_cache, v_cache, k_scales, v_scales, block_tables,
             tile_queries(lens, qlens, num_seqs), block_size, scale);
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_tables,
                                  const at::Tensor& context_lens, int64_t block_size,
                                  double scale, const std::optional<at::Tensor>& k_scales,
                                  const std::optional<at::Tensor>& v_scales) {
  TORCH_CHECK(q.dim() == 3, "q must be [B, H, D], got ", q.sizes());
  const int64_t num_seqs = q.size(0);
  check_inputs("paged_decode_attention", q, k_cache, v_cache, block_tables, context_lens,
               block_size, num_seqs);
  check_tables(block_tables, context_lens, block_size, k_cache.size(0) / block_size);
  const std::vector<int64_t> ones(num_seqs, 1);
  return run(q, k_cache, v_cache, k_scales, v_scales, block_tables,
             tile_queries(context_lens.const_data_ptr<int64_t>(), ones.data(), num_seqs),
             block_size, scale);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(levante_quant, lib) {
  lib.def(
      "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor context_lens, int block_size, float scale, Tensor? k_scales=None, "
      "Tensor? v_scales=None) -> Tensor");
  lib.def(
      "paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor context_lens, Tensor query_lens, int block_size, float scale, "
      "Tensor? k_scales=None, Tensor? v_scales=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(levante_quant, CPU, lib) {
  lib.impl("paged_decode_attention", &paged_decode_attention);
  lib.impl("paged_attention", &paged_attention);
}
