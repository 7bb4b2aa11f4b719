// GGUF Q8_0 / Q4_0 / Q4_1 rows -> the panel layout q_gemm.cpp reads (see its header comment
// and levante.quant.kernels.PackedWeight), written straight into the caller's arrays.
//
// Why C++: PyTorch does this move as strided copies of 2- and 4-byte units, at ~0.15-0.4 GB/s
// here, which made the repack the largest part of `levante generate`'s start after PyTorch's
// own import (0.8 s of SmolLM2's 98 MB). A loop over panels streams each source block once.
// kernels.repack keeps the PyTorch version as the fallback and the tests' reference.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>

namespace {

constexpr int64_t kQ4_0 = 2;
constexpr int64_t kQ4_1 = 3;
constexpr int64_t kQ8_0 = 8;
constexpr int64_t kPanelRows = 8;

// One whole panel (kPanelRows rows), block by block, with every size a compile-time constant:
// the 2- and 4-byte moves become plain loads and stores the compiler unrolls. Measured on
// SmolLM2's 30 MB Q4_1 token_embd (2 threads, destination already faulted in): 18-22 ms with
// the general loop below (which still handles a last, partial panel), 3.8-4.1 ms with this.
template <int64_t kSteps, bool kHasMin>
void repack_full_panel(const uint8_t* src, int64_t nb, uint8_t* q_panel, uint8_t* d_panel,
                       uint8_t* m_panel) {
  constexpr int64_t kHead = kHasMin ? 4 : 2;
  constexpr int64_t kBlock = kHead + 4 * kSteps;
  const int64_t row_bytes = nb * kBlock;
  for (int64_t b = 0; b < nb; ++b) {
    uint8_t* q = q_panel + b * kSteps * kPanelRows * 4;
    for (int64_t r = 0; r < kPanelRows; ++r) {
      const uint8_t* blk = src + r * row_bytes + b * kBlock;
      std::memcpy(d_panel + (b * kPanelRows + r) * 2, blk, 2);
      if constexpr (kHasMin) std::memcpy(m_panel + (b * kPanelRows + r) * 2, blk + 2, 2);
      for (int64_t t = 0; t < kSteps; ++t) {
        std::memcpy(q + (t * kPanelRows + r) * 4, blk + kHead + 4 * t, 4);
      }
    }
  }
}

// raw [N, nb * block_bytes] uint8 (contiguous) -> qs [N, nb * quant_bytes], d [N, nb] and,
// for Q4_1, m [N, nb] (each contiguous, any dtype of that byte width: only bytes move).
void repack_blocks(const at::Tensor& raw, int64_t qtype, const at::Tensor& qs,
                   const at::Tensor& d, const std::optional<at::Tensor>& m) {
  TORCH_CHECK(qtype == kQ8_0 || qtype == kQ4_0 || qtype == kQ4_1,
              "repack_blocks takes Q8_0, Q4_0 or Q4_1 (ggml type 8, 2, 3), got ", qtype);
  const bool has_min = qtype == kQ4_1;
  const int64_t quant = qtype == kQ8_0 ? 32 : 16;
  const int64_t head = has_min ? 4 : 2;  // f16 scale (and min) before the quants
  const int64_t block = head + quant;
  TORCH_CHECK(raw.dim() == 2 && raw.scalar_type() == at::kByte && raw.is_contiguous(),
              "raw must be contiguous uint8 [N, row bytes], got ", raw.sizes());
  TORCH_CHECK(raw.size(1) % block == 0, "a row of ", raw.size(1), " bytes is not whole ",
              block, "-byte blocks");
  const int64_t n = raw.size(0), nb = raw.size(1) / block;
  auto check_out = [&](const at::Tensor& t, int64_t row_bytes, const char* name) {
    TORCH_CHECK(t.is_contiguous() && t.size(0) == n && t.nbytes() == n * row_bytes, name,
                " must be contiguous with ", n, " rows of ", row_bytes, " bytes, got ",
                t.sizes());
  };
  check_out(qs, nb * quant, "qs");
  check_out(d, nb * 2, "d");
  TORCH_CHECK(m.has_value() == has_min, has_min ? "Q4_1 needs m" : "only Q4_1 takes m");
  if (has_min) check_out(*m, nb * 2, "m");

  const uint8_t* src = raw.const_data_ptr<uint8_t>();
  auto* qs_out = static_cast<uint8_t*>(qs.data_ptr());
  auto* d_out = static_cast<uint8_t*>(d.data_ptr());
  auto* m_out = has_min ? static_cast<uint8_t*>(m->data_ptr()) : nullptr;
  const int64_t steps = quant / 4;
  const int64_t num_panels = (n + kPanelRows - 1) / kPanelRows;
  at::parallel_for(0, num_panels, 16, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t row0 = p * kPanelRows;
      const int64_t rows = std::min(kPanelRows, n - row0);
      uint8_t* q_panel = qs_out + row0 * nb * quant;
      uint8_t* d_panel = d_out + row0 * nb * 2;
      uint8_t* m_panel = has_min ? m_out + row0 * nb * 2 : nullptr;
      const uint8_t* panel_src = src + row0 * nb * block;
      if (rows == kPanelRows) {
        if (qtype == kQ4_1) {
          repack_full_panel<4, true>(panel_src, nb, q_panel, d_panel, m_panel);
        } else if (qtype == kQ4_0) {
          repack_full_panel<4, false>(panel_src, nb, q_panel, d_panel, m_panel);
        } else {
          repack_full_panel<8, false>(panel_src, nb, q_panel, d_panel, m_panel);
        }
        continue;
      }
      for (int64_t b = 0; b < nb; ++b) {
        for (int64_t r = 0; r < rows; ++r) {
          const uint8_t* blk = src + (row0 + r) * nb * block + b * block;
          std::memcpy(d_panel + (b * rows + r) * 2, blk, 2);
          if (has_min) std::memcpy(m_panel + (b * rows + r) * 2, blk + 2, 2);
          for (int64_t t = 0; t < steps; ++t) {
            std::memcpy(q_panel + ((b * steps + t) * rows + r) * 4, blk + head + 4 * t, 4);
          }
        }
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(levante_quant, lib) {
  lib.def("repack_blocks(Tensor raw, int qtype, Tensor(a!) qs, Tensor(b!) d, Tensor(c!)? m) -> ()");
}

TORCH_LIBRARY_IMPL(levante_quant, CPU, lib) {
  lib.impl("repack_blocks", &repack_blocks);
}
