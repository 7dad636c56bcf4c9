// Every native kernel's entry point: one declaration each, for the Python bindings (bindings.cpp) and for the
// kernels that call each other (the fused draft step calls the linear and RMSNorm kernels).
#pragma once
#include <torch/extension.h>

#include <vector>

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
std::vector<torch::Tensor> markov_draw(const torch::Tensor& base, const torch::Tensor& anchors,
                                       const torch::Tensor& w1, const torch::Tensor& w2,
                                       const torch::Tensor& draft_to_target, int64_t steps, int64_t candidates,
                                       const torch::Tensor& temperature, const torch::Tensor& top_k,
                                       const torch::Tensor& top_p, const torch::Tensor& uniforms);
