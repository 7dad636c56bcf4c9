// y = x @ w.T for a handful of rows of x (decode and verify steps), fp32, AVX2 + FMA.
//
// A decode step is memory-bound: each weight element should be read from DRAM once and used for every
// row of x while it sits in registers. The micro-kernel multiplies 4 weight rows by up to 3 rows of x
// (12 accumulators + 3 x vectors + 1 weight vector = 16 ymm registers); threads split the weight rows.
#include <immintrin.h>
#include <torch/extension.h>

#include "simd.h"

namespace {

using dspark::hsum;

// out[m * ldy + r] = dot(w row r, x row m) for r < 4, m < MX.
template <int MX>
inline void block(const float* w, const float* x, int64_t K, float* y, int64_t ldy, bool prefetch) {
  __m256 acc[4][MX];
  for (int r = 0; r < 4; ++r)
    for (int m = 0; m < MX; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    __m256 xv[MX];
    for (int m = 0; m < MX; ++m) xv[m] = _mm256_loadu_ps(x + m * K + k);
    if (prefetch)  // pull the next block toward L1 while this one computes: overlaps DRAM with FMAs
      for (int r = 0; r < 4; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + (4 + r) * K + k), _MM_HINT_T0);
    for (int r = 0; r < 4; ++r) {
      const __m256 wv = _mm256_loadu_ps(w + r * K + k);
      for (int m = 0; m < MX; ++m) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  for (int m = 0; m < MX; ++m)
    for (int r = 0; r < 4; ++r) y[m * ldy + r] = hsum(acc[r][m]);
}

}  // namespace

torch::Tensor small_m_linear(const torch::Tensor& x_in, const torch::Tensor& w) {
  TORCH_CHECK(x_in.scalar_type() == torch::kFloat32 && w.scalar_type() == torch::kFloat32, "fp32 only");
  TORCH_CHECK(x_in.dim() == 2 && w.dim() == 2 && x_in.size(1) == w.size(1), "expected x [M, K], w [N, K]");
  TORCH_CHECK(w.is_contiguous(), "weight must be contiguous");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = w.size(0);
  TORCH_CHECK(K % 8 == 0 && N % 4 == 0, "K must be a multiple of 8 and N of 4");
  const torch::Tensor x = x_in.contiguous();
  torch::Tensor y = torch::empty({M, N}, x.options());
  const float* X = x.data_ptr<float>();
  const float* W = w.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, N / 4, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const float* wb = W + b * 4 * K;
      for (int64_t m = 0; m < M; m += 3) {
        const int64_t rows = std::min<int64_t>(3, M - m);
        float* yb = Y + m * N + b * 4;
        const bool prefetch_next = b + 1 < end;
        if (rows == 3) block<3>(wb, X + m * K, K, yb, N, prefetch_next);
        else if (rows == 2) block<2>(wb, X + m * K, K, yb, N, prefetch_next);
        else block<1>(wb, X + m * K, K, yb, N, prefetch_next);
      }
    }
  });
  return y;
}
