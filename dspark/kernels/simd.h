// Helpers shared by the CPU kernels (AVX2 + FMA; AVX-512 where the CPU has it, with the same bits). One
// definition each: the block kernel's products equal the fp32 kernel's bit for bit only because both accumulate
// with the same micro-kernel and reduce with the same horizontal sum.
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

// ---- AVX-512: the same products, two rows of x per register -----------------------------------------------
//
// dot4xM keeps one 8-lane accumulator per output. With AVX-512 two of them share a 512-bit register: lanes
// 0..7 take row m's FMAs, lanes 8..15 row m + 1's, against the same 8 weights broadcast to both halves. Each
// lane does exactly the FMAs it does in dot4xM, in the same order, and each half is reduced by the same hsum,
// so the outputs are dot4xM's bit for bit (on a CPU with or without AVX-512, and whatever the rows), from
// half the instructions: a verify or batched step's few rows are compute-bound on the block kernel's rebuilt
// weights.

// Whether dot4 may take the AVX-512 path: the CPU has it and DSPARK_AVX512 is not "0" (tests flip it to
// compare both paths).
inline bool cpu_has_avx512() { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq"); }

inline bool& avx512_enabled() {
  static const char* env = std::getenv("DSPARK_AVX512");
  static bool enabled = cpu_has_avx512() && !(env && env[0] == '0');
  return enabled;
}

// x [M, K] as ceil(M / 2) pairs of rows interleaved every 8 columns (pair p, step s: row 2p's columns
// 8s..8s+7, then row 2p + 1's, zeros past the last row): one 512-bit load per pair and k step.
inline std::vector<float> paired_rows(const float* x, int64_t M, int64_t K) {
  std::vector<float> out(((M + 1) / 2) * 2 * K, 0.0f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; k += 8)
      std::copy(x + m * K + k, x + m * K + k + 8, out.begin() + (m / 2) * 2 * K + 2 * k + (m % 2) * 8);
  return out;
}

// dot4xM for MP pairs of rows (`rows` of them real, the last pair may hold a padding row): 4 * MP accumulators
// + MP x vectors + 1 weight vector fit the 32 zmm registers at MP = 6.
template <int MP>
__attribute__((target("avx512f,avx512dq"))) inline void dot4xP(const float* w, const float* xp, int64_t K,
                                                                  float* y, int64_t ldy, int64_t rows) {
  __m512 acc[4][MP];
  for (int r = 0; r < 4; ++r)
    for (int p = 0; p < MP; ++p) acc[r][p] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    __m512 xv[MP];
    for (int p = 0; p < MP; ++p) xv[p] = _mm512_loadu_ps(xp + p * 2 * K + 2 * k);
    for (int r = 0; r < 4; ++r) {
      const __m512 wv = _mm512_broadcast_f32x8(_mm256_loadu_ps(w + r * K + k));
      for (int p = 0; p < MP; ++p) acc[r][p] = _mm512_fmadd_ps(wv, xv[p], acc[r][p]);
    }
  }
  for (int p = 0; p < MP; ++p)
    for (int r = 0; r < 4; ++r) {
      y[2 * p * ldy + r] = hsum(_mm512_castps512_ps256(acc[r][p]));
      if (2 * p + 1 < rows) y[(2 * p + 1) * ldy + r] = hsum(_mm512_extractf32x8_ps(acc[r][p], 1));
    }
}

// dot4 over all M rows from their pairs (`paired_rows`), 6 pairs (12 rows) at a time.
__attribute__((target("avx512f,avx512dq"))) inline void dot4_paired(const float* w, const float* xp, int64_t M,
                                                                      int64_t K, float* y, int64_t ldy) {
  for (int64_t p = 0; p < (M + 1) / 2;) {
    const int64_t pairs = std::min<int64_t>(6, (M + 1) / 2 - p), rows = std::min<int64_t>(2 * pairs, M - 2 * p);
    const float* xq = xp + p * 2 * K;
    float* yq = y + 2 * p * ldy;
    switch (pairs) {
      case 6: dot4xP<6>(w, xq, K, yq, ldy, rows); break;
      case 5: dot4xP<5>(w, xq, K, yq, ldy, rows); break;
      case 4: dot4xP<4>(w, xq, K, yq, ldy, rows); break;
      case 3: dot4xP<3>(w, xq, K, yq, ldy, rows); break;
      case 2: dot4xP<2>(w, xq, K, yq, ldy, rows); break;
      default: dot4xP<1>(w, xq, K, yq, ldy, rows);
    }
    p += pairs;
  }
}

}  // namespace dspark
