// Helpers shared by the CPU kernels (AVX2 + FMA). One definition each: the block kernel's products equal the
// fp32 kernel's bit for bit only because both accumulate with the same micro-kernel and reduce with the same
// horizontal sum.
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace dspark {

// The sum of a vector's 8 lanes, always in the same order.
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

// y[m * ldy + r] = dot(w row r, x row m) for r < 4, m < MX: 12 accumulators + 3 x vectors + 1 weight
// vector fill the 16 ymm registers at MX = 3. Each dot product has one accumulator that takes its FMAs in
// ascending k, 8 lanes at a time, then hsum: the order every kernel here keeps, whatever its blocking.
// `prefetch` (may be null) is pulled toward L1 while the FMAs run, 4 rows of `prefetch_stride` bytes.
template <int MX>
inline void dot4xM(const float* w, const float* x, int64_t K, float* y, int64_t ldy, const char* prefetch,
                   int64_t prefetch_stride) {
  __m256 acc[4][MX];
  for (int r = 0; r < 4; ++r)
    for (int m = 0; m < MX; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    __m256 xv[MX];
    for (int m = 0; m < MX; ++m) xv[m] = _mm256_loadu_ps(x + m * K + k);
    if (prefetch)
      for (int r = 0; r < 4; ++r) _mm_prefetch(prefetch + r * prefetch_stride + k * 4, _MM_HINT_T0);
    for (int r = 0; r < 4; ++r) {
      const __m256 wv = _mm256_loadu_ps(w + r * K + k);
      for (int m = 0; m < MX; ++m) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  for (int m = 0; m < MX; ++m)
    for (int r = 0; r < 4; ++r) y[m * ldy + r] = hsum(acc[r][m]);
}

// dot4xM over all M rows of x, 3 at a time; a remainder of one row after a group of 3 goes as 2 + 2 instead
// (dot4xM<1> has only 4 accumulator chains, latency-bound: on the dev machine M = 7 took 788 us as 3+3+1 for
// a 3072 x 576 weight, against 364 us for M = 6). Each output keeps its single chain, so any grouping gives
// the same bits.
inline void dot4(const float* w, const float* x, int64_t M, int64_t K, float* y, int64_t ldy,
                 const char* prefetch, int64_t prefetch_stride) {
  for (int64_t m = 0; m < M;) {
    const int64_t left = M - m;
    const int64_t rows = left >= 3 && left != 4 ? 3 : (left >= 2 ? 2 : 1);
    const float* xm = x + m * K;
    float* ym = y + m * ldy;
    if (rows == 3) dot4xM<3>(w, xm, K, ym, ldy, prefetch, prefetch_stride);
    else if (rows == 2) dot4xM<2>(w, xm, K, ym, ldy, prefetch, prefetch_stride);
    else dot4xM<1>(w, xm, K, ym, ldy, prefetch, prefetch_stride);
    prefetch = nullptr;  // once per weight group is enough
    m += rows;
  }
}

}  // namespace dspark
