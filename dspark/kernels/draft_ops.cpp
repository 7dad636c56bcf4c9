// The DSpark drafter's inference step in a few native calls (dspark/drafters/dspark/model.py, `FusedDraft`).
//
// A draft call multiplies only 7 rows per request by each weight, so in PyTorch it spent more time in Python and
// per-op dispatch (~600 small ops: norms, RoPE, slicing, per-request attention, the Markov loop) than in the
// matmuls. Here each stage is one call that runs the same arithmetic as the PyTorch path: the engine's linear
// kernels on the same packed weights, the same RMSNorm kernel, RoPE in the rotate-half convention, and softmax
// attention of each block against its request's context keys/values (bidirectional inside the block).
//
// A linear layer comes from the Python side (`Linear.kernel_spec`) as 4 tensors (the fp32 weight, then the
// packed q, d, m, undefined where the format has none) and a kind: -1 any (at::linear), 0 fp32 few-row kernel,
// 1 fp16, 2 Q8_0, 3 Q4_1; the row limits below are the ones `Linear.forward` uses, except that fp16 weights (a
// drafter's own, small enough to stay in cache) go through the block kernel at any row count: at 70-224 rows
// (10-32 requests) it multiplies the draft layers' weights 1.4-2.4x faster than at::linear on their fp32 copy.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

#include "attention.h"
#include "ops.h"

namespace {

constexpr int64_t kBlockMaxRows = 64;  // dspark/models/quantized.py MAX_ROWS
constexpr int64_t kSmallMRows = 16;    // dspark/models/linear.py SMALL_M_ROWS
constexpr int64_t kTensorsPerLinear = 4;
constexpr int64_t kTensorsPerLayer = 4 + 4 * kTensorsPerLinear;  // 4 norms, then qkv, o, gate_up, down

torch::Tensor linear(const torch::Tensor& x, int64_t kind, const torch::Tensor* t) {
  const int64_t rows = x.size(0);
  if (kind > 0 && (rows <= kBlockMaxRows || kind == 1)) {
    if (kind == 1) return f16_linear(x, t[1]);
    if (kind == 2) return q8_0_linear(x, t[1], t[2]);
    return q4_1_linear(x, t[1], t[2], t[3]);
  }
  if (kind >= 0 && rows <= kSmallMRows) return small_m_linear(x, t[0]);
  return at::linear(x, t[0]);
}

// RMSNorm of every head_dim-wide piece of x's columns [offset, offset + heads * hd), then RoPE (rotate-half:
// x * cos + roll(x, hd / 2) * signed_sin, with the tables' rows of each row's position). Returns [T, heads, hd].
torch::Tensor norm_rope_heads(const torch::Tensor& x, int64_t offset, int64_t heads, int64_t hd,
                              const torch::Tensor& norm, double eps, const torch::Tensor& cos,
                              const torch::Tensor& sin) {
  const int64_t T = x.size(0);
  torch::Tensor y = rms_norm_rows(x.narrow(1, offset, heads * hd).reshape({T * heads, hd}), norm, eps);
  float* Y = y.data_ptr<float>();
  const float* C = cos.data_ptr<float>();
  const float* S = sin.data_ptr<float>();
  const int64_t half = hd / 2;
  std::vector<float> row(hd);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < heads; ++h) {
      float* v = Y + (t * heads + h) * hd;
      const float* c = C + t * hd;
      const float* sn = S + t * hd;
      std::copy(v, v + hd, row.begin());
      // the two halves apart (no index wrap-around), so the compiler vectorises them
      for (int64_t i = 0; i < half; ++i) v[i] = row[i] * c[i] + row[i + half] * sn[i];
      for (int64_t i = half; i < hd; ++i) v[i] = row[i] * c[i] + row[i - half] * sn[i];
    }
  return y.view({T, heads, hd});
}

// Rows [first, first + n) of k / v [*, kv_heads, hd] into a context buffer [kv_heads, capacity, hd] from row `at`.
void write_rows(const torch::Tensor& k, const torch::Tensor& v, int64_t first, int64_t n, torch::Tensor& keys,
                torch::Tensor& values, int64_t at) {
  const int64_t kv_heads = keys.size(0), capacity = keys.size(1), hd = keys.size(2);
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous() && keys.scalar_type() == torch::kFloat32 &&
                  values.sizes() == keys.sizes() && at + n <= capacity,
              "context buffer too small or not contiguous fp32");
  const float* K = k.data_ptr<float>();
  const float* V = v.data_ptr<float>();
  float* KB = keys.data_ptr<float>();
  float* VB = values.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t h = 0; h < kv_heads; ++h) {
      const int64_t src = ((first + i) * kv_heads + h) * hd, dst = (h * capacity + at + i) * hd;
      std::copy(K + src, K + src + hd, KB + dst);
      std::copy(V + src, V + src + hd, VB + dst);
    }
}

torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2;
  torch::Tensor out = torch::empty({T, I}, gate_up.options());
  const float* G = gate_up.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int64_t t = 0; t < T; ++t) {
    const float* g = G + t * 2 * I;
    float* o = O + t * I;
    int64_t j = 0;
    for (; j + 8 <= I; j += 8) {  // exp8: the scalar std::exp was a tenth of a draft layer's time
      const __m256 gv = _mm256_loadu_ps(g + j);
      const __m256 sig = _mm256_div_ps(gv, _mm256_add_ps(one, dspark::exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
      _mm256_storeu_ps(o + j, _mm256_mul_ps(sig, _mm256_loadu_ps(g + I + j)));
    }
    for (; j < I; ++j) o[j] = g[j] / (1.0f + std::exp(-g[j])) * g[I + j];
  }
  return out;
}

}  // namespace

// The draft layers and final norm over R blocks of `rows` rows (x [R * rows, D], embedded blocks; cos / sin
// [R * rows, hd], their positions' RoPE rows). Request r's block attends to its context, rows [0, lengths[r])
// of keys / values[r * L + l] ([kv_heads, capacity, hd] per layer l), and to all of its own rows, whose keys /
// values are written after the context (scratch: the context length is not advanced).
torch::Tensor draft_layers(torch::Tensor x, const torch::Tensor& cos, const torch::Tensor& sin,
                           const std::vector<torch::Tensor>& weights, const std::vector<int64_t>& kinds,
                           std::vector<torch::Tensor> keys, std::vector<torch::Tensor> values,
                           const std::vector<int64_t>& lengths, int64_t rows, int64_t heads, int64_t kv_heads,
                           double eps, const torch::Tensor& final_norm) {
  const int64_t L = static_cast<int64_t>(weights.size()) / kTensorsPerLayer, R = lengths.size();
  const int64_t T = x.size(0), hd = keys.at(0).size(2), group = heads / kv_heads;
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && T == R * rows, "x must be [R * rows, D]");
  TORCH_CHECK(static_cast<int64_t>(kinds.size()) == 4 * L && static_cast<int64_t>(keys.size()) == R * L &&
                  values.size() == keys.size() && hd % 8 == 0 && hd <= dspark::kMaxHeadDim,
              "inconsistent draft_layers arguments");
  const torch::Tensor c = cos.contiguous(), s = sin.contiguous();
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  for (int64_t l = 0; l < L; ++l) {
    const torch::Tensor* w = weights.data() + l * kTensorsPerLayer;
    const torch::Tensor* lin = w + 4;
    const int64_t* kind = kinds.data() + 4 * l;
    const torch::Tensor qkv = linear(rms_norm_rows(x, w[0], eps), kind[0], lin);
    const torch::Tensor q = norm_rope_heads(qkv, 0, heads, hd, w[1], eps, c, s);
    const torch::Tensor k = norm_rope_heads(qkv, heads * hd, kv_heads, hd, w[2], eps, c, s);
    const torch::Tensor v = qkv.narrow(1, (heads + kv_heads) * hd, kv_heads * hd).contiguous();
    for (int64_t r = 0; r < R; ++r)
      write_rows(k, v, r * rows, rows, keys[r * L + l], values[r * L + l], lengths[r]);
    torch::Tensor attn = torch::zeros({T, heads * hd}, x.options());
    const float* Q = q.data_ptr<float>();
    float* O = attn.data_ptr<float>();
    // items as in ragged_attention (decode_ops.cpp): a request's KV head with some of the rows reading it
    const int64_t per_item = dspark::rows_per_item(T * heads, at::get_num_threads());
    const int64_t items_per_group = (group * rows + per_item - 1) / per_item;
    at::parallel_for(0, R * kv_heads * items_per_group, 1, [&](int64_t begin, int64_t end) {
      dspark::RowsScratch scratch;
      std::vector<dspark::QueryRow> query_rows;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t r = item / (kv_heads * items_per_group), g = item / items_per_group % kv_heads;
        const int64_t first = item % items_per_group * per_item, last = std::min(first + per_item, group * rows);
        const torch::Tensor& K = keys[r * L + l];
        const int64_t base = g * K.size(1) * hd;
        query_rows.clear();
        for (int64_t idx = first; idx < last; ++idx) {
          const int64_t row = (r * rows + idx / group) * heads + g * group + idx % group;
          query_rows.push_back({Q + row * hd, O + row * hd, lengths[r] + rows});
        }
        dspark::attend_rows(query_rows.data(), static_cast<int64_t>(query_rows.size()), K.data_ptr<float>() + base,
                            values[r * L + l].data_ptr<float>() + base, hd, scale, scratch);
      }
    });
    x = x + linear(attn, kind[1], lin + kTensorsPerLinear);
    const torch::Tensor gate_up = linear(rms_norm_rows(x, w[3], eps), kind[2], lin + 2 * kTensorsPerLinear);
    x = x + linear(silu_mul(gate_up), kind[3], lin + 3 * kTensorsPerLinear);
  }
  return rms_norm_rows(x, final_norm, eps);
}

// A request's new context rows: features [n, layers * target width] -> fc -> hidden_norm, then per draft layer
// l its keys (k_norm, RoPE at the rows' positions) and values, written to keys / values[l] from row `start`.
// weights: fc's 4, hidden_norm, then per layer kv's 4 and k_norm; kinds: fc's, then each layer's kv's.
void draft_context_append(const torch::Tensor& features, const torch::Tensor& cos, const torch::Tensor& sin,
                          const std::vector<torch::Tensor>& weights, const std::vector<int64_t>& kinds,
                          std::vector<torch::Tensor> keys, std::vector<torch::Tensor> values, int64_t start,
                          double eps) {
  const int64_t L = keys.size(), n = features.size(0), kv_heads = keys.at(0).size(0), hd = keys.at(0).size(2);
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == 5 + L * 5 && static_cast<int64_t>(kinds.size()) == 1 + L,
              "inconsistent draft_context_append arguments");
  const torch::Tensor c = cos.contiguous(), s = sin.contiguous();
  const torch::Tensor f = rms_norm_rows(linear(features.contiguous(), kinds[0], weights.data()), weights[4], eps);
  for (int64_t l = 0; l < L; ++l) {
    const torch::Tensor* w = weights.data() + 5 + 5 * l;
    const torch::Tensor kv = linear(f, kinds[1 + l], w);
    const torch::Tensor k = norm_rope_heads(kv, 0, kv_heads, hd, w[4], eps, c, s);
    const torch::Tensor v = kv.narrow(1, kv_heads * hd, kv_heads * hd).contiguous();
    write_rows(k, v, 0, n, keys[l], values[l], start);
  }
}

namespace {

// The order-preserving integer key of a float (larger float, larger key): radix selection works on these.
inline uint32_t order_key(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The k-th largest of v[0, n) counted with multiplicity (1 <= k <= n), by one radix pass over the keys' top
// 12 bits and a selection inside the one bin that holds it: ~2 passes over a row instead of a sort.
float kth_largest(const float* v, int64_t n, int64_t k, std::vector<uint32_t>& bin_keys) {
  constexpr int kShift = 20;
  std::vector<int64_t> count(size_t{1} << (32 - kShift), 0);
  for (int64_t j = 0; j < n; ++j) ++count[order_key(v[j]) >> kShift];
  int64_t bin = static_cast<int64_t>(count.size()) - 1, above = 0;
  for (; above + count[bin] < k; --bin) above += count[bin];
  bin_keys.clear();
  for (int64_t j = 0; j < n; ++j)
    if (static_cast<int64_t>(order_key(v[j]) >> kShift) == bin) bin_keys.push_back(order_key(v[j]));
  auto kth = bin_keys.begin() + (k - above - 1);
  std::nth_element(bin_keys.begin(), kth, bin_keys.end(), std::greater<uint32_t>());
  const uint32_t key = *kth, u = (key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key;
  float out;
  std::memcpy(&out, &u, sizeof out);
  return out;
}

// a . b with four independent accumulators: a candidate's bias is a short dot (rank 256), bound by the FMA
// latency chain of a single accumulator.
inline float row_dot(const float* a, const float* b, int64_t n) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32)
    for (int c = 0; c < 4; ++c)
      acc[c] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8 * c), _mm256_loadu_ps(b + i + 8 * c), acc[c]);
  for (; i + 8 <= n; i += 8) acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc[0]);
  float total = dspark::hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

}  // namespace

namespace {

// One position's candidates: draft ids in ascending order and their logits base + W2 . W1[previous token].
struct Candidates {
  std::vector<int32_t> ids;
  std::vector<float> logits;
};

// A sampled row's distribution over its candidates, as dspark/sampling.py `processed_probs` makes it of logits
// that are -inf elsewhere: logits / T, top-k (ties with the k-th value kept), then top-p over what top-k kept (a
// token goes when the mass at or below it in descending order, ties in index order, is <= 1 - top_p; the top
// token always stays), then softmax. Writes probs into p [V] (already zero) at the kept ids.
void filtered_probs(const Candidates& c, float temperature, int64_t top_k, float top_p, float* p,
                    std::vector<int32_t>& order, std::vector<float>& scaled) {
  const int64_t n = c.ids.size();
  scaled.resize(n);
  for (int64_t i = 0; i < n; ++i) scaled[i] = c.logits[i] / temperature;
  order.resize(n);
  for (int64_t i = 0; i < n; ++i) order[i] = static_cast<int32_t>(i);
  // Candidates are in id order, so position order breaks ties as the id order does.
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
    return scaled[a] > scaled[b] || (scaled[a] == scaled[b] && a < b);
  });
  int64_t keep = n;
  if (top_k > 0 && top_k < n) {
    const float kth = scaled[order[top_k - 1]];
    for (keep = top_k; keep < n && scaled[order[keep]] >= kth;) ++keep;
  }
  const float top = scaled[order[0]];
  double mass = 0.0;
  for (int64_t i = 0; i < keep; ++i) mass += std::exp(static_cast<double>(scaled[order[i]] - top));
  if (top_p < 1.0f) {
    double above = 0.0;
    int64_t i = 0;
    for (; i < keep; ++i) {
      if (i > 0 && (mass - above) / mass <= 1.0 - static_cast<double>(top_p)) break;
      above += std::exp(static_cast<double>(scaled[order[i]] - top));
    }
    keep = i;
    mass = above;
  }
  for (int64_t i = 0; i < keep; ++i)
    p[c.ids[order[i]]] = static_cast<float>(std::exp(static_cast<double>(scaled[order[i]] - top)) / mass);
}

// The first candidate whose cumulative probability (float64, id order) exceeds u * total: sampling.py
// `sample_rows` on the whole row, whose other entries are zero.
int64_t inverse_cdf(const Candidates& c, const float* p, double u) {
  double total = 0.0;
  for (const int32_t j : c.ids) total += p[j];
  const double point = std::min(u * total, std::nextafter(total, 0.0));
  double cdf = 0.0;
  for (const int32_t j : c.ids)
    if ((cdf += p[j]) > point) return j;
  return c.ids.back();  // unreachable: point < total
}

}  // namespace

// The Markov head's draw, left to right: position k's logits are base[:, k] + W2 . W1[previous token] (the first
// previous token is the anchor) over the draft tokens whose base logit is among the position's `candidates`
// largest (ties at the last one kept), -inf elsewhere, so only those rows of W2 are read: the full matvec read
// all of W2 (4 MB at rank 256) per position for a bias that almost never lifts a token from outside the
// backbone's top few hundred (model card). A greedy row (temperature <= 0) takes the first argmax. A sampled row
// draws from temperature / top-k / top-p of those logits (`processed_probs`) by inverse CDF at uniforms[r, k]
// (`sample_rows`), and returns that distribution: rejection sampling needs the one the token was drawn from,
// whatever it is, to stay lossless.
// base [R, S, V]; anchors [R] target ids; w1 [vocab, rank]; w2 [V, rank] fp32; draft_to_target [V]; temperature,
// top_k, top_p [R]; uniforms [R, steps] float64. Returns the drawn target ids [R, steps], the previous-token
// embeddings W1[x_{k-1}] [R, steps, rank] (the confidence head's input) and the sampled rows' draft distributions
// [R, steps, V] (zeros for greedy rows; [0] when no row samples).
std::vector<torch::Tensor> markov_draw(const torch::Tensor& base_in, const torch::Tensor& anchors,
                                       const torch::Tensor& w1, const torch::Tensor& w2,
                                       const torch::Tensor& draft_to_target, int64_t steps, int64_t candidates,
                                       const torch::Tensor& temperature, const torch::Tensor& top_k,
                                       const torch::Tensor& top_p, const torch::Tensor& uniforms) {
  const torch::Tensor base = base_in.contiguous();
  const int64_t R = base.size(0), S = base.size(1), V = base.size(2), rank = w1.size(1);
  TORCH_CHECK(base.scalar_type() == torch::kFloat32 && steps <= S && anchors.size(0) == R &&
                  draft_to_target.size(0) == V && w1.is_contiguous() && w1.scalar_type() == torch::kFloat32 &&
                  w2.is_contiguous() && w2.scalar_type() == torch::kFloat32 && w2.size(0) == V &&
                  w2.size(1) == rank && candidates >= 1,
              "inconsistent markov_draw arguments");
  TORCH_CHECK(anchors.scalar_type() == torch::kInt64 && anchors.is_contiguous(), "anchors must be int64");
  TORCH_CHECK(temperature.scalar_type() == torch::kFloat32 && temperature.numel() == R &&
                  top_k.scalar_type() == torch::kInt64 && top_k.numel() == R &&
                  top_p.scalar_type() == torch::kFloat32 && top_p.numel() == R &&
                  uniforms.scalar_type() == torch::kFloat64 && uniforms.dim() == 2 && uniforms.size(0) == R &&
                  uniforms.size(1) >= steps,
              "markov_draw needs temperature / top_p float32, top_k int64 [R] and uniforms float64 [R, steps]");
  const torch::Tensor temp = temperature.contiguous(), tk = top_k.contiguous(), tp = top_p.contiguous(),
                      unif = uniforms.contiguous();
  const float* T = temp.data_ptr<float>();
  const int64_t* TK = tk.data_ptr<int64_t>();
  const float* TP = tp.data_ptr<float>();
  const double* U = unif.data_ptr<double>();
  bool any_sampled = false;
  for (int64_t r = 0; r < R; ++r) any_sampled |= T[r] > 0;
  torch::Tensor tokens = torch::empty({R, steps}, anchors.options());
  torch::Tensor embeddings = torch::empty({R, steps, rank}, base.options());
  torch::Tensor probs =
      any_sampled ? torch::zeros({R, steps, V}, base.options()) : torch::empty({0}, base.options());
  const float* B = base.data_ptr<float>();
  const float* W1 = w1.data_ptr<float>();
  const float* W2 = w2.data_ptr<float>();
  const int64_t* d2t = draft_to_target.data_ptr<int64_t>();
  const int64_t* anchor = anchors.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK(anchor[r] >= 0 && anchor[r] < w1.size(0), "anchor id ", anchor[r], " outside the vocabulary");
  int64_t* out = tokens.data_ptr<int64_t>();
  float* E = embeddings.data_ptr<float>();
  float* P = any_sampled ? probs.data_ptr<float>() : nullptr;
  // The candidates depend on the base logits only: every position's floor first, in parallel; then each
  // request's chain on its own thread.
  std::vector<float> floors(R * steps, -INFINITY);
  if (candidates < V)
    at::parallel_for(0, R * steps, 1, [&](int64_t begin, int64_t end) {
      std::vector<uint32_t> scratch;
      for (int64_t i = begin; i < end; ++i)
        floors[i] = kth_largest(B + ((i / steps) * S + i % steps) * V, V, candidates, scratch);
    });
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    Candidates c;
    std::vector<int32_t> order;
    std::vector<float> scaled;
    for (int64_t r = begin; r < end; ++r) {
      int64_t prev = anchor[r];
      for (int64_t k = 0; k < steps; ++k) {
        const float* b = B + (r * S + k) * V;
        const float* e = W1 + prev * rank;
        std::copy(e, e + rank, E + (r * steps + k) * rank);
        const float floor = floors[r * steps + k];
        c.ids.clear();
        c.logits.clear();
        for (int64_t j = 0; j < V; ++j) {
          if (!(b[j] >= floor)) continue;
          c.ids.push_back(static_cast<int32_t>(j));
          c.logits.push_back(b[j] + row_dot(W2 + j * rank, e, rank));
        }
        TORCH_CHECK(!c.ids.empty(), "no finite base logit to draw from");
        int64_t best = -1;
        if (T[r] > 0) {
          float* p = P + (r * steps + k) * V;
          filtered_probs(c, T[r], TK[r], TP[r], p, order, scaled);
          best = inverse_cdf(c, p, U[r * unif.size(1) + k]);
        } else {
          float best_value = -INFINITY;
          for (size_t i = 0; i < c.ids.size(); ++i)
            if (best < 0 || c.logits[i] > best_value) best_value = c.logits[i], best = c.ids[i];
        }
        out[r * steps + k] = prev = d2t[best];
      }
    }
  });
  return {tokens, embeddings, probs};
}
