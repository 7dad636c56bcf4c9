// Attention helpers shared by the decode kernels (decode_ops.cpp) and the fused draft step (draft_ops.cpp).
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

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

// Attention of one query row against keys/values [0, length), in three stages that every kernel runs in the
// same order, so a row's output does not depend on which other rows share the call (a verify step's outputs
// are a decode step's). Stage 1: scores for keys [j0, j1) into p (scale applied; full blocks of 8 by dot8, the
// row's last length % 8 keys one by one), keeping the running maxima. Stage 2: p becomes exp(p - max) and
// the row's 1 / sum is returned. Stage 3: o += p[j] / sum * V[j] for keys [j0, j1), in ascending j.
struct RowMax {
  __m256 lanes = _mm256_set1_ps(-INFINITY);
  float tail = -INFINITY;
};

inline void row_scores(const float* q, const float* K, int64_t j0, int64_t j1, int64_t length, int64_t d,
                       float scale, float* p, RowMax& max) {
  const __m256 vscale = _mm256_set1_ps(scale);
  const int64_t full = std::min(j1, length / 8 * 8);
  int64_t j = j0;  // j0 is a multiple of 8
  for (; j < full; j += 8) {
    const __m256 s = _mm256_mul_ps(dot8(q, K + j * d, d), vscale);
    _mm256_storeu_ps(p + j, s);
    max.lanes = _mm256_max_ps(max.lanes, s);
  }
  for (; j < std::min(j1, length); ++j) max.tail = std::max(max.tail, p[j] = dot(q, K + j * d, d) * scale);
}

// p needs length rounded up to 8 slots: the tail is padded with -inf (exp8 clamps it to ~1e-38, nothing next
// to the row's maximum, whose exp is 1) and the padded slots are never read back.
inline float row_softmax(float* p, int64_t length, const RowMax& max) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, max.lanes);
  float max_score = max.tail;
  for (float lane : lanes) max_score = std::max(max_score, lane);
  for (int64_t t = length; t < ((length + 7) / 8) * 8; ++t) p[t] = -INFINITY;
  const __m256 vm = _mm256_set1_ps(max_score);
  __m256 vtotal = _mm256_setzero_ps();
  for (int64_t j = 0; j < length; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j), vm));
    _mm256_storeu_ps(p + j, e);
    vtotal = _mm256_add_ps(vtotal, e);
  }
  return 1.0f / hsum(vtotal);
}

inline void row_values(const float* p, float inv_total, const float* V, int64_t j0, int64_t j1, int64_t d,
                       float* o) {
  __m256 acc[kMaxHeadDim / 8];
  const int64_t blocks = d / 8;
  for (int64_t b = 0; b < blocks; ++b) acc[b] = _mm256_loadu_ps(o + 8 * b);
  for (int64_t j = j0; j < j1; ++j) {
    const __m256 pj = _mm256_set1_ps(p[j] * inv_total);
    const float* vj = V + j * d;
    for (int64_t b = 0; b < blocks; ++b) acc[b] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 8 * b), acc[b]);
  }
  for (int64_t b = 0; b < blocks; ++b) _mm256_storeu_ps(o + 8 * b, acc[b]);
}

// One query row against keys/values [0, length): o += softmax(q.K^T * scale) V. p: scratch of >= length + 8.
inline void attend_row(const float* q, const float* K, const float* V, int64_t length, int64_t d, float scale,
                       float* p, float* o) {
  RowMax max;
  row_scores(q, K, 0, length, length, d, scale, p, max);
  row_values(p, row_softmax(p, length, max), V, 0, length, d, o);
}

// Query rows that share one KV head's keys/values (the query heads of a GQA group, a block's tokens), each
// against its own prefix: attend_row's stages row by row (the same bits), but K and V are walked in chunks
// of kKeyChunk keys that every row uses while they sit in L1, instead of once per row from L2 or memory.
struct QueryRow {
  const float* q;
  float* o;
  int64_t length;
};

constexpr int64_t kKeyChunk = 64;  // 16 KB of keys or values at head dim 64
constexpr int64_t kRowsPerItem = 24;  // a verify block of 8 tokens x 3 query heads per KV head

// Rows per work item of a step's attention (`rows` query rows in all): up to kRowsPerItem rows share one
// item's pass over K and V, fewer when the step has few rows, so that every thread gets ~4 items.
inline int64_t rows_per_item(int64_t rows, int64_t threads) {
  return std::clamp<int64_t>((rows + 4 * threads - 1) / (4 * threads), 1, kRowsPerItem);
}

class RowsScratch {
 public:
  // p for `count` rows of up to `longest` keys, and their maxima
  void reset(int64_t count, int64_t longest) {
    stride_ = (longest + 15) / 8 * 8;
    p_.resize(count * stride_);
    max_.assign(count, RowMax());
    inv_.resize(count);
  }
  float* p(int64_t i) { return p_.data() + i * stride_; }
  RowMax& max(int64_t i) { return max_[i]; }
  float& inv(int64_t i) { return inv_[i]; }

 private:
  int64_t stride_ = 0;
  std::vector<float> p_;
  std::vector<RowMax> max_;
  std::vector<float> inv_;
};

inline void attend_rows(const QueryRow* rows, int64_t count, const float* K, const float* V, int64_t d,
                        float scale, RowsScratch& scratch) {
  int64_t longest = 0;
  for (int64_t i = 0; i < count; ++i) longest = std::max(longest, rows[i].length);
  scratch.reset(count, longest);
  for (int64_t j0 = 0; j0 < longest; j0 += kKeyChunk)
    for (int64_t i = 0; i < count; ++i)
      if (j0 < rows[i].length)
        row_scores(rows[i].q, K, j0, std::min(j0 + kKeyChunk, rows[i].length), rows[i].length, d, scale,
                   scratch.p(i), scratch.max(i));
  for (int64_t i = 0; i < count; ++i) scratch.inv(i) = row_softmax(scratch.p(i), rows[i].length, scratch.max(i));
  for (int64_t j0 = 0; j0 < longest; j0 += kKeyChunk)
    for (int64_t i = 0; i < count; ++i)
      if (j0 < rows[i].length)
        row_values(scratch.p(i), scratch.inv(i), V, j0, std::min(j0 + kKeyChunk, rows[i].length), d, rows[i].o);
}

}  // namespace dspark
