// Decode-step paged attention on CPU: each sequence's one new query token attends to its whole
// cached context, read in place from the paged K/V pool (no gather into a padded batch).
//
// Shapes (all float32 but the int64 index tensors, all contiguous):
//   q            [B, H, D]                          one query token per sequence
//   k/v_cache    [num_blocks * block_size, KV, D]   one layer's pool, a row per slot
//   block_tables [B, max_blocks]                    block ids; entries past a context unused
//   context_lens [B]                                keys each sequence attends to (>= 1)
//   out          [B, H, D]
// Token t of sequence b sits in slot block_tables[b][t / block_size] * block_size
// + t % block_size, and query head h reads KV head h / G with G = H / KV (GQA):
//   scores[h, t] = scale * q[b, h] . k[slot(t), h / G]
//   out[b, h] = sum_t softmax_t(scores[h])[t] * v[slot(t), h / G]
// The softmax subtracts each row's max before exp and runs in float32.
//
// Work is split by tokens, not heads (as flash-decoding does): a task is a run of whole blocks
// of one sequence, all heads at once, so it streams each block's K and V rows as one contiguous
// [block_size, KV, D] stretch, and one long sequence still splits evenly over the threads
// (SmolLM2 has 3 KV heads: one task per (sequence, KV head) left one of 2 threads idle a third
// of the time; in a 500-token decode step such tasks took 65 us a layer, these 45 us). Each
// task keeps its own softmax max m, sum l and unnormalised output o per head; a sequence's
// tasks then merge:  M = max_c m_c,  out = sum_c exp(m_c - M) o_c / sum_c exp(m_c - M) l_c.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

struct Problem {
  const float* q;
  const float* k;
  const float* v;
  const int64_t* tables;
  const int64_t* lens;
  int64_t num_heads, num_kv_heads, head_dim, max_blocks, block_size;
  float scale;
};

// A run of whole blocks [first_block, end_block) of sequence seq.
struct Task {
  int64_t seq, first_block, end_block;
};

// One task's result per head: softmax max, sum of exp(score - max), unnormalised output.
struct Partial {
  float* max;   // [H]
  float* sum;   // [H]
  float* out;   // [H, D]
};

#if defined(__AVX2__) && defined(__FMA__)
#define LPA_AVX2 1
#include <immintrin.h>

// The sums of four vectors' lanes: [sum(a), sum(b), sum(c), sum(d)].
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

// scores[r][i..i+4) = scale * q[r] . k rows i..i+4, for kHeads query heads r that read the same
// KV head: each K load feeds kHeads FMAs, and 4 * kHeads chains run side by side.
template <int kHeads>
inline void score_rows4(const float* const* q, const float* k, int64_t stride, int64_t d,
                        float scale, float* const* scores) {
  __m256 acc[kHeads][4];
  for (int r = 0; r < kHeads; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm256_setzero_ps();
  for (int64_t j = 0; j < d; j += 8) {
    __m256 rows[4];
    for (int c = 0; c < 4; ++c) rows[c] = _mm256_loadu_ps(k + c * stride + j);
    for (int r = 0; r < kHeads; ++r) {
      const __m256 x = _mm256_loadu_ps(q[r] + j);
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm256_fmadd_ps(x, rows[c], acc[r][c]);
    }
  }
  for (int r = 0; r < kHeads; ++r)
    _mm_storeu_ps(scores[r], _mm_mul_ps(hsum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]),
                                        _mm_set1_ps(scale)));
}

// out[r][0..32) += sum_i w[r][i] * v_i[0..32) over n rows, for kHeads heads reading the same
// KV head: each V load feeds kHeads FMAs.
template <int kHeads>
inline void accumulate_cols32(const float* const* w, const float* v, int64_t stride, int64_t n,
                              float* const* out) {
  __m256 acc[kHeads][4];
  for (int r = 0; r < kHeads; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm256_loadu_ps(out[r] + 8 * c);
  for (int64_t i = 0; i < n; ++i, v += stride) {
    __m256 cols[4];
    for (int c = 0; c < 4; ++c) cols[c] = _mm256_loadu_ps(v + 8 * c);
    for (int r = 0; r < kHeads; ++r) {
      const __m256 x = _mm256_set1_ps(w[r][i]);
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm256_fmadd_ps(x, cols[c], acc[r][c]);
    }
  }
  for (int r = 0; r < kHeads; ++r)
    for (int c = 0; c < 4; ++c) _mm256_storeu_ps(out[r] + 8 * c, acc[r][c]);
}
#endif

// scores[h * ld + i] = scale * q[h] . k_i[h / group] for the n rows of one block, each row
// [KV, D] at k + i * stride, and the H query heads q [H, D].
void score_block(const float* q, int64_t num_heads, int64_t group, int64_t d, const float* k,
                 int64_t stride, int64_t n, float scale, float* scores, int64_t ld) {
  int64_t i = 0;
#ifdef LPA_AVX2
  if (d % 8 == 0) {
    for (; i + 4 <= n; i += 4) {  // 4 rows at a time, query heads in pairs sharing a KV head
      for (int64_t h = 0; h < num_heads;) {
        const int64_t paired = (h + 1) % group != 0;  // h + 1 reads the same KV head
        const float* qs[2] = {q + h * d, q + (h + paired) * d};
        float* out[2] = {scores + h * ld + i, scores + (h + paired) * ld + i};
        const float* rows = k + i * stride + h / group * d;
        if (paired)
          score_rows4<2>(qs, rows, stride, d, scale, out);
        else
          score_rows4<1>(qs, rows, stride, d, scale, out);
        h += 1 + paired;
      }
    }
  }
#endif
  for (; i < n; ++i) {
    for (int64_t h = 0; h < num_heads; ++h) {
      const float* ki = k + i * stride + h / group * d;
      float acc = 0.0f;
      for (int64_t j = 0; j < d; ++j) acc += q[h * d + j] * ki[j];
      scores[h * ld + i] = scale * acc;
    }
  }
}

// out[h] += sum_i w[h * ld + i] * v_i[h / group] for the n rows of one block (as score_block).
void accumulate_block(const float* w, int64_t ld, int64_t num_heads, int64_t group, int64_t d,
                      const float* v, int64_t stride, int64_t n, float* out) {
  int64_t j0 = 0;
#ifdef LPA_AVX2
  for (; j0 + 32 <= d; j0 += 32) {  // 32 columns at a time, query heads in pairs as above
    for (int64_t h = 0; h < num_heads;) {
      const int64_t paired = (h + 1) % group != 0;
      const float* ws[2] = {w + h * ld, w + (h + paired) * ld};
      float* os[2] = {out + h * d + j0, out + (h + paired) * d + j0};
      const float* cols = v + h / group * d + j0;
      if (paired)
        accumulate_cols32<2>(ws, cols, stride, n, os);
      else
        accumulate_cols32<1>(ws, cols, stride, n, os);
      h += 1 + paired;
    }
  }
#endif
  for (int64_t h = 0; h < num_heads; ++h)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = j0; j < d; ++j)
        out[h * d + j] += w[h * ld + i] * v[i * stride + h / group * d + j];
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
inline void prefetch_rows(const float* rows, int64_t num_floats) {
  constexpr int64_t kLineFloats = 64 / sizeof(float);
  for (int64_t i = 0; i < num_floats; i += kLineFloats) __builtin_prefetch(rows + i);
}

// One task: every head of its sequence over its blocks. scores: scratch of H * len floats.
void attend_task(const Problem& p, const Task& task, float* scores, const Partial& part) {
  const int64_t d = p.head_dim, num_heads = p.num_heads, group = p.num_heads / p.num_kv_heads;
  const int64_t stride = p.num_kv_heads * d;  // floats from one slot to the next
  const int64_t* table = p.tables + task.seq * p.max_blocks;
  const int64_t start = task.first_block * p.block_size;
  const int64_t len = std::min(task.end_block * p.block_size, p.lens[task.seq]) - start;
  const float* q = p.q + task.seq * num_heads * d;  // [H, D]
  auto block_rows = [&](const float* cache, int64_t t0) {  // the block holding token start + t0
    return cache + table[task.first_block + t0 / p.block_size] * p.block_size * stride;
  };

  // Pass 1: scores[h, t], block by block (a block's rows are consecutive slots).
  prefetch_rows(block_rows(p.k, 0), std::min(p.block_size, len) * stride);
  for (int64_t t0 = 0; t0 < len; t0 += p.block_size) {
    if (t0 + p.block_size < len)
      prefetch_rows(block_rows(p.k, t0 + p.block_size),
                    std::min(p.block_size, len - t0 - p.block_size) * stride);
    else
      prefetch_rows(block_rows(p.v, 0), std::min(p.block_size, len) * stride);
    score_block(q, num_heads, group, d, block_rows(p.k, t0), stride,
                std::min(p.block_size, len - t0), p.scale, scores + t0, len);
  }
  for (int64_t h = 0; h < num_heads; ++h)
    exp_shifted(scores + h * len, len, &part.max[h], &part.sum[h]);
  // Pass 2: out[h] = sum_t exp(scores[h, t] - max) * v[t].
  std::fill(part.out, part.out + num_heads * d, 0.0f);
  for (int64_t t0 = 0; t0 < len; t0 += p.block_size) {
    if (t0 + p.block_size < len)
      prefetch_rows(block_rows(p.v, t0 + p.block_size),
                    std::min(p.block_size, len - t0 - p.block_size) * stride);
    accumulate_block(scores + t0, len, num_heads, group, d, block_rows(p.v, t0), stride,
                     std::min(p.block_size, len - t0), part.out);
  }
}

// out[h] of one sequence from its tasks' partials (see the top of the file).
void merge(const Partial* parts, int64_t num_parts, int64_t num_heads, int64_t d, float* out) {
  for (int64_t h = 0; h < num_heads; ++h) {
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t c = 0; c < num_parts; ++c) top = std::max(top, parts[c].max[h]);
    float total = 0.0f;
    std::fill(out + h * d, out + (h + 1) * d, 0.0f);
    for (int64_t c = 0; c < num_parts; ++c) {
      const float weight = std::exp(parts[c].max[h] - top);
      total += weight * parts[c].sum[h];
      for (int64_t j = 0; j < d; ++j) out[h * d + j] += weight * parts[c].out[h * d + j];
    }
    const float inverse = 1.0f / total;  // total >= 1: the top task's sum counts exp(0)
    for (int64_t j = 0; j < d; ++j) out[h * d + j] *= inverse;
  }
}

void check_inputs(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& block_tables, const at::Tensor& context_lens,
                  int64_t block_size) {
  for (const at::Tensor* t : {&q, &k_cache, &v_cache, &block_tables, &context_lens})
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(),
                "paged_decode_attention takes contiguous CPU tensors, got one on ", t->device(),
                t->is_contiguous() ? "" : " (not contiguous)");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat &&
                  v_cache.scalar_type() == at::kFloat,
              "q, k_cache and v_cache must be float32, got ", q.scalar_type(), ", ",
              k_cache.scalar_type(), ", ", v_cache.scalar_type());
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "block_tables and context_lens must be int64, got ", block_tables.scalar_type(),
              ", ", context_lens.scalar_type());
  TORCH_CHECK(q.dim() == 3, "q must be [B, H, D], got ", q.sizes());
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
  const int64_t num_seqs = q.size(0);
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

// Tokens per task, rounded up to whole blocks. Fixed, so a sequence's result depends on
// neither the batch nor the thread count; short enough that one sequence of a few hundred
// tokens splits over a few threads, long enough that the merge costs next to nothing.
constexpr int64_t kTaskTokens = 128;

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_tables,
                                  const at::Tensor& context_lens, int64_t block_size,
                                  double scale) {
  check_inputs(q, k_cache, v_cache, block_tables, context_lens, block_size);
  check_tables(block_tables, context_lens, block_size, k_cache.size(0) / block_size);
  at::Tensor out = at::empty(q.sizes(), q.options());
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), d = q.size(2);
  const Problem p{q.const_data_ptr<float>(), k_cache.const_data_ptr<float>(),
                  v_cache.const_data_ptr<float>(), block_tables.const_data_ptr<int64_t>(),
                  context_lens.const_data_ptr<int64_t>(), num_heads, k_cache.size(1), d,
                  block_tables.size(1), block_size, static_cast<float>(scale)};
  const int64_t task_blocks = (kTaskTokens + block_size - 1) / block_size;
  std::vector<Task> tasks;
  std::vector<int64_t> first_task(num_seqs + 1);  // sequence b's tasks: [first[b], first[b+1])
  for (int64_t b = 0; b < num_seqs; ++b) {
    first_task[b] = static_cast<int64_t>(tasks.size());
    const int64_t num_blocks = (p.lens[b] + block_size - 1) / block_size;
    for (int64_t blk = 0; blk < num_blocks; blk += task_blocks)
      tasks.push_back({b, blk, std::min(blk + task_blocks, num_blocks)});
  }
  first_task[num_seqs] = static_cast<int64_t>(tasks.size());
  const int64_t num_tasks = first_task[num_seqs];
  std::vector<float> partials(num_tasks * num_heads * (d + 2));
  std::vector<Partial> parts(num_tasks);
  for (int64_t c = 0; c < num_tasks; ++c) {
    float* base = partials.data() + c * num_heads * (d + 2);
    parts[c] = {base, base + num_heads, base + 2 * num_heads};
  }
  const int64_t task_len = task_blocks * block_size;
  // A task is ~2 * H * len * D multiply-adds; waking a thread (~2-3 us) pays from ~64K.
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / (2 * num_heads * task_len * d));
  at::parallel_for(0, num_tasks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(num_heads * task_len);
    for (int64_t c = begin; c < end; ++c) attend_task(p, tasks[c], scores.data(), parts[c]);
  });
  float* op = out.mutable_data_ptr<float>();
  for (int64_t b = 0; b < num_seqs; ++b)
    merge(parts.data() + first_task[b], first_task[b + 1] - first_task[b], num_heads, d,
          op + b * num_heads * d);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(levante_quant, lib) {
  lib.def(
      "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor context_lens, int block_size, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(levante_quant, CPU, lib) {
  lib.impl("paged_decode_attention", &paged_decode_attention);
}
