// y = x @ w.T for a handful of rows of x (decode and verify steps), fp32, AVX2 + FMA or AVX-512.
//
// Each weight element should be read from memory once and used for every row of x while it sits in L1. The
// micro-kernels (simd.h) multiply 4 weight rows by every row of x, in the linear kernels' one order; threads
// split the weight rows.
#include <immintrin.h>
#include <torch/extension.h>

#include "simd.h"

torch::Tensor small_m_linear(const torch::Tensor& x_in, const torch::Tensor& w) {
  TORCH_CHECK(x_in.scalar_type() == torch::kFloat32 && w.scalar_type() == torch::kFloat32, "fp32 only");
  TORCH_CHECK(x_in.dim() == 2 && w.dim() == 2 && x_in.size(1) == w.size(1), "expected x [M, K], w [N, K]");
  TORCH_CHECK(w.is_contiguous(), "weight must be contiguous");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = w.size(0);
  TORCH_CHECK(K % 16 == 0 && N % 4 == 0, "K must be a multiple of 16 and N of 4");
  const torch::Tensor x = x_in.contiguous();
  torch::Tensor y = torch::empty({M, N}, x.options());
  const float* X = x.data_ptr<float>();
  const float* W = w.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  if (dspark::avx512_enabled()) {  // the same bits from half the instructions (simd.h)
    at::parallel_for(0, N / 4, 16, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) dspark::dot4_wide(W + b * 4 * K, X, M, K, Y + b * 4, N);
    });
    return y;
  }
  at::parallel_for(0, N / 4, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      // pull the next group toward L1 while this one computes: overlaps DRAM with FMAs
      const char* next = b + 1 < end ? reinterpret_cast<const char*>(W + (b + 1) * 4 * K) : nullptr;
      dspark::dot4(W + b * 4 * K, X, M, K, Y + b * 4, N, next, K * 4);
    }
  });
  return y;
}
