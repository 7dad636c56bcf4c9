// y = x @ w.T for up to a few dozen rows of x (decode and verify steps, batched), with w stored as the blocks
// it was quantized to, or as fp16 when every weight is an fp16 value (AVX2 + FMA + F16C, or AVX-512).
//
// The default target ships as GGUF: its layer weights are Q4_1 (per 32 weights: w = d * q + m, q in 0..15)
// and its embedding / LM head Q8_0 (w = d * q, q in -127..127). Dequantized to fp32 they are exactly
// d * q + m (d * q is exact in fp32), so the kernel rebuilds each weight vector in registers with one FMA
// (one multiply for Q8_0): bit for bit the fp32 weight. Each product then keeps the linear kernels' one order
// (simd.h), so the output equals small_m_linear's bit for bit (and each row's output is the same whatever the
// other rows), while a step reads 0.75 (Q4_1) or 1.13 (Q8_0) bytes per weight, fp32 scales included, instead
// of 4.
//
// A step's few rows are bound by the rebuild's arithmetic more than by the bytes: on AVX-512 each 16 weights
// are rebuilt by one instruction per stage and multiplied at once by up to 8 rows of x, in registers. Past
// that (AVX2: from 2 rows), each group of 4 weight rows is rebuilt once into an fp32 scratch that stays in L1
// and small_m_linear's own micro-kernel multiplies it by every row: the rebuild is paid once per weight and
// call, and with up to ~100 rows this beats oneDNN's fp32 GEMM (it reads 4 bytes per weight).
//
// fp16 (a drafter's weights, stored as fp16 and widened exactly) works the same way with one conversion per
// 8 (16) weights and 2 bytes each.
//
// Layout (built by dspark/models/quantized.py): q4 [N, K/2] bytes, 16 per block in ggml's order (byte j: weight
// j in the low nibble, weight j + 16 in the high one); q8 [N, K] int8; d and m [N, K/32] fp32.
#include <immintrin.h>
#include <torch/extension.h>

#include <vector>

#include "simd.h"

namespace {

using dspark::hsum;

enum class Kind { Q4_1, Q8_0, F16 };

// The 32 weights of one row's block kb, rebuilt exactly into w[0..3] (8 each, in k order).
template <Kind KIND>
inline void weights32(const uint8_t* q, int64_t kb, __m256 d, __m256 m, __m256 w[4]) {
  if constexpr (KIND == Kind::Q4_1) {
    // ggml's Q4_1 nibble order: byte j holds weight j (low nibble) and weight j + 16 (high nibble).
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + kb * 16));
    const __m256i first = _mm256_cvtepu8_epi32(bytes);                      // bytes 0..7
    const __m256i second = _mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8));  // bytes 8..15
    const __m256i low = _mm256_set1_epi32(0xF);
    w[0] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_and_si256(first, low)), m);
    w[1] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_and_si256(second, low)), m);
    w[2] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_srli_epi32(first, 4)), m);
    w[3] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_srli_epi32(second, 4)), m);
  } else if constexpr (KIND == Kind::Q8_0) {
    for (int g = 0; g < 4; ++g) {
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + kb * 32 + g * 8));
      w[g] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)));
    }
  } else {
    for (int g = 0; g < 4; ++g)
      w[g] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + (kb * 32 + g * 8) * 2)));
  }
}

// Block kb of one weight row (its scales d[kb], m[kb] where the format has them), rebuilt into w[0..3].
template <Kind KIND>
inline void rebuilt32(const uint8_t* q, const float* d, const float* m, int64_t kb, __m256 w[4]) {
  const __m256 dv = KIND == Kind::F16 ? _mm256_setzero_ps() : _mm256_broadcast_ss(d + kb);
  const __m256 mv = KIND == Kind::Q4_1 ? _mm256_broadcast_ss(m + kb) : _mm256_setzero_ps();
  weights32<KIND>(q, kb, dv, mv, w);
}

// One row of x against 4 weight rows, AVX2: out[r] = dot(weight row r, x) for r < 4 in the linear kernels'
// order (simd.h), each chain in two registers (the 4 rows share the loads of x).
template <Kind KIND>
inline void four_rows(const uint8_t* q, int64_t q_stride, const float* d, const float* m, int64_t s_stride,
                      const float* x, int64_t K, float* y) {
  __m256 lo[4], hi[4];
  for (int r = 0; r < 4; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
  for (int64_t kb = 0; kb < K / 32; ++kb) {
    for (int r = 0; r < 4; ++r) {
      __m256 w[4];
      const float* dr = d ? d + r * s_stride : nullptr;
      const float* mr = m ? m + r * s_stride : nullptr;
      rebuilt32<KIND>(q + r * q_stride, dr, mr, kb, w);
      const float* xk = x + kb * 32;
      lo[r] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xk), lo[r]);
      hi[r] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xk + 8), hi[r]);
      lo[r] = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xk + 16), lo[r]);
      hi[r] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xk + 24), hi[r]);
    }
  }
  for (int r = 0; r < 4; ++r) y[r] = dspark::hsum16(lo[r], hi[r]);
}

// The 4 weight rows of a group rebuilt into fp32 (`out` [4, K]): once per call, whatever the number of
// rows of x, which the fp32 micro-kernel then reads from L1.
template <Kind KIND>
inline void rebuild4(const uint8_t* q, int64_t q_stride, const float* d, const float* m, int64_t s_stride,
                     int64_t K, float* out) {
  for (int r = 0; r < 4; ++r)
    for (int64_t kb = 0; kb < K / 32; ++kb) {
      __m256 w[4];
      rebuilt32<KIND>(q + r * q_stride, d ? d + r * s_stride : nullptr, m ? m + r * s_stride : nullptr, kb, w);
      for (int g = 0; g < 4; ++g) _mm256_storeu_ps(out + r * K + kb * 32 + g * 8, w[g]);
    }
}

// ---- AVX-512: 16 weights rebuilt per instruction, one register per chain ------------------------------------

// Block kb of one weight row rebuilt into w[0] (weights 0..15) and w[1] (16..31): the same values as
// rebuilt32 (the same FMA or product per weight), from half the instructions.
template <Kind KIND>
__attribute__((target("avx512f,avx512dq"))) inline void rebuilt32_wide(const uint8_t* q, const float* d,
                                                                         const float* m, int64_t kb, __m512 w[2]) {
  if constexpr (KIND == Kind::Q4_1) {
    // ggml's nibble order puts weights 0..15 in the low nibbles of the 16 bytes and 16..31 in the high ones.
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + kb * 16)));
    const __m512 dv = _mm512_set1_ps(d[kb]), mv = _mm512_set1_ps(m[kb]);
    w[0] = _mm512_fmadd_ps(dv, _mm512_cvtepi32_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(0xF))), mv);
    w[1] = _mm512_fmadd_ps(dv, _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4)), mv);
  } else if constexpr (KIND == Kind::Q8_0) {
    const __m512 dv = _mm512_set1_ps(d[kb]);
    for (int g = 0; g < 2; ++g) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + kb * 32 + g * 16));
      w[g] = _mm512_mul_ps(dv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)));
    }
  } else {
    for (int g = 0; g < 2; ++g)
      w[g] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + (kb * 32 + g * 16) * 2)));
  }
}

// MX rows of x against R weight rows, each 16 weights rebuilt in a register and used at once by every row:
// for a decode or verify step's 1-8 rows the rebuild is the work, and a scratch's store and reload would add
// to it (2 rows took 1.2x one row's time this way, 1.5x through the scratch). R x MX accumulators stay within
// 16 of the 32 registers: 4 weight rows for up to 4 rows of x, 2 for up to 8.
template <Kind KIND, int R, int MX>
__attribute__((target("avx512f,avx512dq"))) inline void rows_in_registers(
    const uint8_t* q, int64_t q_stride, const float* d, const float* m, int64_t s_stride, const float* x,
    int64_t K, float* y, int64_t ldy) {
  static_assert(R * MX <= 16, "accumulators must leave registers for the weights and constants");
  __m512 acc[R][MX];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < MX; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < K / 32; ++kb)
    for (int r = 0; r < R; ++r) {
      __m512 w[2];
      rebuilt32_wide<KIND>(q + r * q_stride, d ? d + r * s_stride : nullptr, m ? m + r * s_stride : nullptr, kb, w);
      for (int i = 0; i < MX; ++i) {
        const float* xk = x + i * K + kb * 32;
        acc[r][i] = _mm512_fmadd_ps(w[0], _mm512_loadu_ps(xk), acc[r][i]);
        acc[r][i] = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(xk + 16), acc[r][i]);
      }
    }
  for (int i = 0; i < MX; ++i)
    for (int r = 0; r < R; ++r) y[i * ldy + r] = dspark::hsum16(acc[r][i]);
}

// Up to this many rows of x the AVX-512 path rebuilds in registers, every row in one pass over a group's
// blocks (which stay in L1); past it, once per call into the fp32 scratch, which the fp32 micro-kernel then
// multiplies by 6 rows at a time. Per layer of the default target on the 2-core Xeon (2 threads, us): 1-4 rows
// 84, 104, 124, 145 in registers, 4 weight rows a pass; 5-8 rows took 217, 246, 264, 281 in two passes of 4
// rows of x (each weight rebuilt twice), and take 178, 204, 235, 262 with 2 weight rows a pass (at 8 rows the
// FMAs and the rebuild fill the vector ports); 12 rows 359 through the scratch.
constexpr int64_t kRowsInRegisters = 8;

// A group's 4 weight rows against M <= kRowsInRegisters rows of x, each weight rebuilt once.
template <Kind KIND>
inline void few_rows_wide(const uint8_t* q, int64_t q_stride, const float* d, const float* m, int64_t s_stride,
                          const float* x, int64_t M, int64_t K, float* y, int64_t ldy) {
  if (M > 4) {  // two weight rows at a time: 2 x 8 accumulators
    for (int64_t r = 0; r < 4; r += 2) {
      const uint8_t* qr = q + r * q_stride;
      const float* dr = d ? d + r * s_stride : nullptr;
      const float* mr = m ? m + r * s_stride : nullptr;
      switch (M) {
        case 5: rows_in_registers<KIND, 2, 5>(qr, q_stride, dr, mr, s_stride, x, K, y + r, ldy); break;
        case 6: rows_in_registers<KIND, 2, 6>(qr, q_stride, dr, mr, s_stride, x, K, y + r, ldy); break;
        case 7: rows_in_registers<KIND, 2, 7>(qr, q_stride, dr, mr, s_stride, x, K, y + r, ldy); break;
        default: rows_in_registers<KIND, 2, 8>(qr, q_stride, dr, mr, s_stride, x, K, y + r, ldy);
      }
    }
    return;
  }
  switch (M) {
    case 1: rows_in_registers<KIND, 4, 1>(q, q_stride, d, m, s_stride, x, K, y, ldy); break;
    case 2: rows_in_registers<KIND, 4, 2>(q, q_stride, d, m, s_stride, x, K, y, ldy); break;
    case 3: rows_in_registers<KIND, 4, 3>(q, q_stride, d, m, s_stride, x, K, y, ldy); break;
    default: rows_in_registers<KIND, 4, 4>(q, q_stride, d, m, s_stride, x, K, y, ldy);
  }
}

template <Kind KIND>
__attribute__((target("avx512f,avx512dq"))) inline void rebuild4_wide(const uint8_t* q, int64_t q_stride,
                                                                        const float* d, const float* m,
                                                                        int64_t s_stride, int64_t K, float* out) {
  for (int r = 0; r < 4; ++r)
    for (int64_t kb = 0; kb < K / 32; ++kb) {
      __m512 w[2];
      rebuilt32_wide<KIND>(q + r * q_stride, d ? d + r * s_stride : nullptr, m ? m + r * s_stride : nullptr, kb, w);
      _mm512_storeu_ps(out + r * K + kb * 32, w[0]);
      _mm512_storeu_ps(out + r * K + kb * 32 + 16, w[1]);
    }
}

template <Kind KIND>
torch::Tensor run(const torch::Tensor& x_in, const torch::Tensor& q, const torch::Tensor& d,
                  const torch::Tensor& m) {
  constexpr bool Q4 = KIND == Kind::Q4_1, SCALED = KIND != Kind::F16;
  TORCH_CHECK(x_in.scalar_type() == torch::kFloat32 && x_in.dim() == 2, "x must be [M, K] fp32");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = q.size(0);
  TORCH_CHECK(K % 32 == 0 && N % 4 == 0, "K must be a multiple of 32 and N of 4");
  const int64_t q_stride = Q4 ? K / 2 : (KIND == Kind::F16 ? 2 * K : K);  // bytes per row
  TORCH_CHECK(q.is_contiguous() && q.dim() == 2 && q.size(1) * q.element_size() == q_stride,
              "q has the wrong shape");
  if (SCALED)
    TORCH_CHECK(d.is_contiguous() && d.scalar_type() == torch::kFloat32 && d.size(0) == N &&
                    d.size(1) == K / 32,
                "d must be [N, K/32] fp32");
  if (Q4)
    TORCH_CHECK(m.is_contiguous() && m.scalar_type() == torch::kFloat32 && m.sizes() == d.sizes(),
                "m must be [N, K/32] fp32");
  const torch::Tensor x = x_in.contiguous();
  torch::Tensor y = torch::empty({M, N}, x.options());
  const float* X = x.data_ptr<float>();
  const uint8_t* Q = static_cast<const uint8_t*>(q.data_ptr());
  const float* D = SCALED ? d.data_ptr<float>() : nullptr;
  const float* Mn = Q4 ? m.data_ptr<float>() : nullptr;
  float* Y = y.data_ptr<float>();
  const int64_t s_stride = K / 32;
  const bool wide = dspark::avx512_enabled();  // the same bits from half the instructions (simd.h)
  const bool scratch = wide ? M > kRowsInRegisters : M > 1;
  at::parallel_for(0, N / 4, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> rebuilt(scratch ? 4 * K : 0);
    for (int64_t b = begin; b < end; ++b) {
      const uint8_t* qb = Q + b * 4 * q_stride;
      const float* db = SCALED ? D + b * 4 * s_stride : nullptr;
      const float* mb = Q4 ? Mn + b * 4 * s_stride : nullptr;
      if (!scratch && wide) {
        few_rows_wide<KIND>(qb, q_stride, db, mb, s_stride, X, M, K, Y + b * 4, N);
      } else if (!scratch) {
        four_rows<KIND>(qb, q_stride, db, mb, s_stride, X, K, Y + b * 4);
      } else if (wide) {
        rebuild4_wide<KIND>(qb, q_stride, db, mb, s_stride, K, rebuilt.data());
        dspark::dot4_wide(rebuilt.data(), X, M, K, Y + b * 4, N);
      } else {
        rebuild4<KIND>(qb, q_stride, db, mb, s_stride, K, rebuilt.data());
        dspark::dot4(rebuilt.data(), X, M, K, Y + b * 4, N, nullptr, 0);
      }
    }
  });
  return y;
}

}  // namespace

torch::Tensor q4_1_linear(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& d,
                          const torch::Tensor& m) {
  TORCH_CHECK(q.scalar_type() == torch::kUInt8, "q4 must be uint8");
  return run<Kind::Q4_1>(x, q, d, m);
}

torch::Tensor q8_0_linear(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& d) {
  TORCH_CHECK(q.scalar_type() == torch::kInt8, "q8 must be int8");
  return run<Kind::Q8_0>(x, q, d, d);
}

torch::Tensor f16_linear(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(w.scalar_type() == torch::kHalf, "w must be fp16");
  return run<Kind::F16>(x, w, w, w);
}
