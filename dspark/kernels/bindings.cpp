#include <torch/extension.h>

torch::Tensor small_m_linear(const torch::Tensor& x, const torch::Tensor& w);
torch::Tensor q4_1_linear(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& d,
                          const torch::Tensor& m);
torch::Tensor q8_0_linear(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& d);
torch::Tensor f16_linear(const torch::Tensor& x, const torch::Tensor& w);
torch::Tensor rms_norm_rows(const torch::Tensor& x, const torch::Tensor& w, double eps);
torch::Tensor block_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                              int64_t start, int64_t n);
torch::Tensor ragged_attention(const torch::Tensor& q, const torch::Tensor& k_new, const torch::Tensor& v_new,
                               torch::Tensor k_cache, torch::Tensor v_cache, const torch::Tensor& layout);
torch::Tensor draft_layers(torch::Tensor x, const torch::Tensor& cos, const torch::Tensor& sin,
                           const std::vector<torch::Tensor>& weights, const std::vector<int64_t>& kinds,
                           std::vector<torch::Tensor> keys, std::vector<torch::Tensor> values,
                           const std::vector<int64_t>& lengths, int64_t rows, int64_t heads, int64_t kv_heads,
                           double eps, const torch::Tensor& final_norm);
void draft_context_append(const torch::Tensor& features, const torch::Tensor& cos, const torch::Tensor& sin,
                          const std::vector<torch::Tensor>& weights, const std::vector<int64_t>& kinds,
                          std::vector<torch::Tensor> keys, std::vector<torch::Tensor> values, int64_t start,
                          double eps);
std::vector<torch::Tensor> markov_greedy(const torch::Tensor& base, const torch::Tensor& anchors,
                                         const torch::Tensor& w1, int64_t w2_kind,
                                         const std::vector<torch::Tensor>& w2, const torch::Tensor& draft_to_target,
                                         int64_t steps);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("small_m_linear", &small_m_linear, "x @ w.T for few rows of x (fp32, AVX2)");
  m.def("q4_1_linear", &q4_1_linear, "x @ w.T, w as Q4_1 blocks rebuilt exactly (few rows, AVX2)");
  m.def("q8_0_linear", &q8_0_linear, "x @ w.T, w as Q8_0 blocks rebuilt exactly (few rows, AVX2)");
  m.def("f16_linear", &f16_linear, "x @ w.T, w fp16 widened exactly (few rows, AVX2 + F16C)");
  m.def("rms_norm_rows", &rms_norm_rows, "RMSNorm of each row (fp32)");
  m.def("block_attention", &block_attention, "attention of a few new tokens against their cache slot (fp32)");
  m.def("ragged_attention", &ragged_attention, "append and attend a ragged batch of short blocks (fp32)");
  m.def("draft_layers", &draft_layers, "the DSpark drafter's layers and final norm over blocks (fp32)");
  m.def("draft_context_append", &draft_context_append, "a DSpark drafter's new context keys/values (fp32)");
  m.def("markov_greedy", &markov_greedy, "the Markov head's greedy left-to-right draw (fp32)");
}
