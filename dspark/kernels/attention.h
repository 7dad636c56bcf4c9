// Attention helpers shared by the decode kernels (decode_ops.cpp) and the fused draft step (draft_ops.cpp).
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "simd.h"

namespace dspark {

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

}  // namespace dspark
