// Helpers shared by the CPU kernels (AVX2 + FMA; AVX-512 where the CPU has it, with the same bits). One
// definition each: the block kernel's products equal the fp32 kernel's bit for bit only because both keep the
// order below and reduce with the same horizontal sum.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <vector>

namespace dspark {

// The sum of a vector's 8 lanes, always in the same order.
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

// ---- The linear kernels' one order --------------------------------------------------------------------------
//
// Every product of the linear kernels (small_m_linear, the block kernel, the fused draft step) is one chain of
// 16 lanes: lane l takes the FMAs of k = l, l + 16, l + 32, ... in ascending k, then `hsum16` adds lanes l and
// l + 8 and reduces the 8 sums by `hsum`. The chain does not depend on how many rows share a call, so a row's
// output is the same whatever the other rows (a verify step's logits are a decode step's), and AVX-512 (one
// 16-lane register per chain) and AVX2 (two 8-lane registers, `lo` for k % 16 < 8 and `hi` for the rest) give
// the same bits. 16 lanes rather than 8: on AVX-512 one register holds a chain, and the block kernel rebuilds
// 16 weights per instruction; measured on the 2-core Xeon (one thread, a 3072 x 576 Q4_1 weight), one row took
// 98 us against 139 us in the 8-lane order, and 2 and 4 rows 120 and 178 us against ~230 and ~280.

inline float hsum16(__m256 lo, __m256 hi) { return hsum(_mm256_add_ps(lo, hi)); }

// y[m * ldy + r] = dot(w row r, x row m) for r < 4 and every m < M, AVX2: 8 accumulators (4 chains of two
// registers) + 2 x vectors + 1 weight vector. `prefetch` (may be null) is pulled toward L1 while the FMAs
// run, 4 rows of `prefetch_stride` bytes, during the first row.
inline void dot4(const float* w, const float* x, int64_t M, int64_t K, float* y, int64_t ldy,
                 const char* prefetch, int64_t prefetch_stride) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    __m256 lo[4], hi[4];
    for (int r = 0; r < 4; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      const __m256 xl = _mm256_loadu_ps(xm + k), xh = _mm256_loadu_ps(xm + k + 8);
      if (prefetch)
        for (int r = 0; r < 4; ++r) _mm_prefetch(prefetch + r * prefetch_stride + k * 4, _MM_HINT_T0);
      for (int r = 0; r < 4; ++r) {
        lo[r] = _mm256_fmadd_ps(_mm256_loadu_ps(w + r * K + k), xl, lo[r]);
        hi[r] = _mm256_fmadd_ps(_mm256_loadu_ps(w + r * K + k + 8), xh, hi[r]);
      }
    }
    for (int r = 0; r < 4; ++r) y[m * ldy + r] = hsum16(lo[r], hi[r]);
    prefetch = nullptr;  // once per weight group is enough
  }
}

// ---- AVX-512: one register per chain --------------------------------------------------------------------

// Whether the kernels may take the AVX-512 paths: the CPU has them and DSPARK_AVX512 is not "0" (tests flip it
// to compare both paths).
inline bool cpu_has_avx512() { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq"); }

inline bool& avx512_enabled() {
  static const char* env = std::getenv("DSPARK_AVX512");
  static bool enabled = cpu_has_avx512() && !(env && env[0] == '0');
  return enabled;
}

__attribute__((target("avx512f,avx512dq"))) inline float hsum16(__m512 v) {
  return hsum16(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
}

// dot4 for MX rows of x at once: 4 * MX accumulators + MX x vectors + 1 weight vector fit the 32 zmm
// registers at MX = 6.
template <int MX>
__attribute__((target("avx512f,avx512dq"))) inline void dot4x16(const float* w, const float* x, int64_t K,
                                                                   float* y, int64_t ldy) {
  __m512 acc[4][MX];
  for (int r = 0; r < 4; ++r)
    for (int m = 0; m < MX; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    __m512 xv[MX];
    for (int m = 0; m < MX; ++m) xv[m] = _mm512_loadu_ps(x + m * K + k);
    for (int r = 0; r < 4; ++r) {
      const __m512 wv = _mm512_loadu_ps(w + r * K + k);
      for (int m = 0; m < MX; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  for (int m = 0; m < MX; ++m)
    for (int r = 0; r < 4; ++r) y[m * ldy + r] = hsum16(acc[r][m]);
}

// dot4 over all M rows, 6 at a time (a remainder goes as one smaller group).
__attribute__((target("avx512f,avx512dq"))) inline void dot4_wide(const float* w, const float* x, int64_t M,
                                                                    int64_t K, float* y, int64_t ldy) {
  for (int64_t m = 0; m < M;) {
    const int64_t rows = std::min<int64_t>(6, M - m);
    const float* xm = x + m * K;
    float* ym = y + m * ldy;
    switch (rows) {
      case 6: dot4x16<6>(w, xm, K, ym, ldy); break;
      case 5: dot4x16<5>(w, xm, K, ym, ldy); break;
      case 4: dot4x16<4>(w, xm, K, ym, ldy); break;
      case 3: dot4x16<3>(w, xm, K, ym, ldy); break;
      case 2: dot4x16<2>(w, xm, K, ym, ldy); break;
      default: dot4x16<1>(w, xm, K, ym, ldy);
    }
    m += rows;
  }
}

}  // namespace dspark
