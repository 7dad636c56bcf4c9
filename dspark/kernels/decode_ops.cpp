// Small fused ops of a decode step, where PyTorch's per-op dispatch costs more than the arithmetic:
// RMSNorm over a few rows, and attention of short blocks of new tokens against their KV-cache slots.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include "simd.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kMaxHeadDim = 256;

// exp of 8 floats (Cephes' expf polynomial on a range reduction by ln 2; relative error ~1e-7, like expf):
// softmax over a few hundred keys per row spent most of its time in scalar std::exp.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
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
  y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

using dspark::hsum;

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  return hsum(acc);
}

// q . K[j] for 8 consecutive keys, as one vector: eight accumulators reduced together by a transpose of
// horizontal adds, instead of a full horizontal reduction per key.
inline __m256 dot8(const float* q, const float* K, int64_t d) {
  __m256 acc[8];
  for (int k = 0; k < 8; ++k) acc[k] = _mm256_setzero_ps();
  for (int64_t c = 0; c < d; c += 8) {
    const __m256 qv = _mm256_loadu_ps(q + c);
    for (int k = 0; k < 8; ++k) acc[k] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(K + k * d + c), acc[k]);
  }
  const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
  const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// One query row against keys/values [0, length): o += softmax(q.K^T * scale) V. p: scratch of >= length + 8.
inline void attend_row(const float* qv, const float* K, const float* V, int64_t length, int64_t d, float scale,
                       float* p, float* o) {
  const __m256 vscale = _mm256_set1_ps(scale);
  int64_t j = 0;
  __m256 vmax = _mm256_set1_ps(-INFINITY);
  for (; j + 8 <= length; j += 8) {
    const __m256 s = _mm256_mul_ps(dot8(qv, K + j * d, d), vscale);
    _mm256_storeu_ps(p + j, s);
    vmax = _mm256_max_ps(vmax, s);
  }
  float max_score = -INFINITY;
  for (; j < length; ++j) max_score = std::max(max_score, p[j] = dot(qv, K + j * d, d) * scale);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  for (float lane : lanes) max_score = std::max(max_score, lane);
  // exp in blocks of 8; the tail is padded with -inf (exp8 clamps it to ~1e-38, nothing next to the row's
  // maximum, whose exp is 1) and the padded slots are never read back.
  for (int64_t t = length; t < ((length + 7) / 8) * 8; ++t) p[t] = -INFINITY;
  const __m256 vm = _mm256_set1_ps(max_score);
  __m256 vtotal = _mm256_setzero_ps();
  for (j = 0; j < length; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j), vm));
    _mm256_storeu_ps(p + j, e);
    vtotal = _mm256_add_ps(vtotal, e);
  }
  const float inv_total = 1.0f / hsum(vtotal);
  __m256 acc[kMaxHeadDim / 8];
  const int64_t blocks = d / 8;
  for (int64_t b = 0; b < blocks; ++b) acc[b] = _mm256_loadu_ps(o + 8 * b);
  for (j = 0; j < length; ++j) {
    const __m256 pj = _mm256_set1_ps(p[j] * inv_total);
    const float* vj = V + j * d;
    for (int64_t b = 0; b < blocks; ++b) acc[b] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 8 * b), acc[b]);
  }
  for (int64_t b = 0; b < blocks; ++b) _mm256_storeu_ps(o + 8 * b, acc[b]);
}

}  // namespace

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
  std::vector<float> p(start + n + 8);
  for (int64_t h = 0; h < heads; ++h) {
    const float* K = k.data_ptr<float>() + h * k.stride(0);
    const float* V = v.data_ptr<float>() + h * v.stride(0);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t row = h * rows + r;
      attend_row(q.data_ptr<float>() + row * d, K, V, start + r % n + 1, d, scale, p.data(),
                 out.data_ptr<float>() + row * d);
    }
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
  at::parallel_for(0, R * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / H, h = item % H;
      const int64_t slot = L[3 * r], start = L[3 * r + 1], n = L[3 * r + 2];
      const float* K = KC + (slot * Hkv + h / group) * max_len * d;
      const float* V = VC + (slot * Hkv + h / group) * max_len * d;
      p.resize(start + n + 8);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t row = (offsets[r] + i) * H + h;
        attend_row(Q + row * d, K, V, start + i + 1, d, scale, p.data(), O + row * d);
      }
    }
  });
  return out;
}
