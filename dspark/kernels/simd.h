// Helpers shared by the CPU kernels (AVX2). One definition: the block kernel's products equal the fp32
// kernel's bit for bit only because both reduce their accumulators with this same sum.
#pragma once
#include <immintrin.h>

namespace dspark {

// The sum of a vector's 8 lanes, always in the same order.
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

}  // namespace dspark
