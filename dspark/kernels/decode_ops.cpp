// Small fused ops of a decode step, where PyTorch's per-op dispatch costs more than the arithmetic:
// RMSNorm over a few rows, and attention of short blocks of new tokens against their KV-cache slots.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include "attention.h"

#include <algorithm>
#include <cmath>
#include <vector>

using dspark::attend_row;
using dspark::kMaxHeadDim;

// y = x / sqrt(mean(x^2) + eps) * w, row by row (fp32).
torch::Tensor rms_norm_rows(const torch::Tensor& x_in, const torch::Tensor& w, double eps) {
  TORCH_CHECK(x_in.scalar_type() == torch::kFloat32 && x_in.dim() == 2 && w.size(0) == x_in.size(1));
  const torch::Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), dim = x.size(1);
  torch::Tensor y = torch::empty_like(x);
  const float* X = x.data_ptr<float>();
  const float* W = w.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = X + r * dim;
    float* yr = Y + r * dim;
    double sum_sq = 0.0;  // double: hidden states of sink tokens reach 1e3+, a float running sum drifts
    for (int64_t i = 0; i < dim; ++i) sum_sq += static_cast<double>(xr[i]) * xr[i];
    const float inv = 1.0f / std::sqrt(static_cast<float>(sum_sq / dim) + static_cast<float>(eps));
    for (int64_t i = 0; i < dim; ++i) yr[i] = W[i] * (xr[i] * inv);
  }
  return y;
}

// Attention of a short block of new tokens against its KV-cache slot. q [kv_heads, rows, d] stacks, per KV
// head, the query heads sharing it: row r is query token r % n, which sees keys [0, start + r % n].
// k, v: [kv_heads, >= start + n, d] with contiguous rows.
torch::Tensor block_attention(const torch::Tensor& q_in, const torch::Tensor& k, const torch::Tensor& v,
                              int64_t start, int64_t n) {
  TORCH_CHECK(q_in.scalar_type() == torch::kFloat32 && q_in.dim() == 3 && k.dim() == 3 && v.dim() == 3);
  const torch::Tensor q = q_in.contiguous();
  const int64_t heads = q.size(0), rows = q.size(1), d = q.size(2);
  TORCH_CHECK(n > 0 && rows % n == 0 && d % 8 == 0 && d <= kMaxHeadDim && k.size(1) >= start + n && v.size(1) >= start + n);
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1 && k.stride(1) == d && v.stride(1) == d,
              "cache rows must be contiguous");
  torch::Tensor out = torch::zeros_like(q);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  dspark::RowsScratch scratch;
  std::vector<dspark::QueryRow> query_rows(rows);
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t row = h * rows + r;
      query_rows[r] = {q.data_ptr<float>() + row * d, out.data_ptr<float>() + row * d, start + r % n + 1};
    }
    dspark::attend_rows(query_rows.data(), rows, k.data_ptr<float>() + h * k.stride(0),
                        v.data_ptr<float>() + h * v.stride(0), d, scale, scratch);
  }
  return out;
}

// Attention of a whole ragged batch of short blocks in one call: the per-request Python loop it replaces
// cost more than the arithmetic at batch 8+. Appends every request's new keys/values to its cache slot,
// then each (request, query head) attends causally within its block and to everything cached before it.
// q [T, H, d], k_new / v_new [T, Hkv, d] in request order; caches [slots, Hkv, max_len, d] contiguous;
// layout [R, 3] int64 rows (slot, start, n). Query head h reads KV head h / (H / Hkv). Returns [T, H, d].
torch::Tensor ragged_attention(const torch::Tensor& q_in, const torch::Tensor& k_new_in,
                               const torch::Tensor& v_new_in, torch::Tensor k_cache, torch::Tensor v_cache,
                               const torch::Tensor& layout_in) {
  TORCH_CHECK(q_in.scalar_type() == torch::kFloat32 && k_cache.scalar_type() == torch::kFloat32);
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4);
  const torch::Tensor q = q_in.contiguous(), k_new = k_new_in.contiguous(), v_new = v_new_in.contiguous();
  const torch::Tensor layout = layout_in.to(torch::kInt64).contiguous();
  const int64_t T = q.size(0), H = q.size(1), d = q.size(2), Hkv = k_new.size(1), R = layout.size(0);
  const int64_t max_len = k_cache.size(2), group = H / Hkv;
  TORCH_CHECK(d % 8 == 0 && d <= kMaxHeadDim && H % Hkv == 0 && k_cache.size(1) == Hkv && k_cache.size(3) == d);
  const int64_t* L = layout.data_ptr<int64_t>();
  std::vector<int64_t> offsets(R + 1, 0);
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(L[3 * r] >= 0 && L[3 * r] < k_cache.size(0) && L[3 * r + 1] + L[3 * r + 2] <= max_len);
    offsets[r + 1] = offsets[r] + L[3 * r + 2];
  }
  TORCH_CHECK(offsets[R] == T, "layout covers ", offsets[R], " tokens, q has ", T);
  float* KC = k_cache.data_ptr<float>();
  float* VC = v_cache.data_ptr<float>();
  const float* KN = k_new.data_ptr<float>();
  const float* VN = v_new.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r) {
    const int64_t slot = L[3 * r], start = L[3 * r + 1];
    for (int64_t i = 0; i < L[3 * r + 2]; ++i) {
      for (int64_t h = 0; h < Hkv; ++h) {
        const int64_t dst = ((slot * Hkv + h) * max_len + start + i) * d, src = ((offsets[r] + i) * Hkv + h) * d;
        std::copy(KN + src, KN + src + d, KC + dst);
        std::copy(VN + src, VN + src + d, VC + dst);
      }
    }
  }
  torch::Tensor out = torch::zeros_like(q);
  const float* Q = q.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  // Work items: a request's KV head with some of the query rows reading it (its group's heads x the block's
  // tokens), so K and V are read once per item (attend_rows).
  const int64_t per_item = dspark::rows_per_item(T * H, at::get_num_threads());
  struct Item {
    int64_t r, g, first, last;  // rows [first, last) of the group's group * n, token-major
  };
  std::vector<Item> items;
  for (int64_t r = 0; r < R; ++r)
    for (int64_t g = 0; g < Hkv; ++g)
      for (int64_t first = 0; first < group * L[3 * r + 2]; first += per_item)
        items.push_back({r, g, first, std::min(first + per_item, group * L[3 * r + 2])});
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    dspark::RowsScratch scratch;
    std::vector<dspark::QueryRow> rows;
    for (int64_t it = begin; it < end; ++it) {
      const Item& item = items[it];
      const int64_t slot = L[3 * item.r], start = L[3 * item.r + 1];
      rows.clear();
      for (int64_t idx = item.first; idx < item.last; ++idx) {
        const int64_t i = idx / group, h = item.g * group + idx % group;
        const int64_t row = (offsets[item.r] + i) * H + h;
        rows.push_back({Q + row * d, O + row * d, start + i + 1});
      }
      const int64_t base = (slot * Hkv + item.g) * max_len * d;
      dspark::attend_rows(rows.data(), static_cast<int64_t>(rows.size()), KC + base, VC + base, d, scale, scratch);
    }
  });
  return out;
}
