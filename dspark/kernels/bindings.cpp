#include <torch/extension.h>

#include "ops.h"
#include "simd.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("small_m_linear", &small_m_linear, "x @ w.T for few rows of x (fp32, AVX2 / AVX-512)");
  m.def("q4_1_linear", &q4_1_linear, "x @ w.T, w as Q4_1 blocks rebuilt exactly (few rows, AVX2 / AVX-512)");
  m.def("q8_0_linear", &q8_0_linear, "x @ w.T, w as Q8_0 blocks rebuilt exactly (few rows, AVX2 / AVX-512)");
  m.def("f16_linear", &f16_linear, "x @ w.T, w fp16 widened exactly (few rows, AVX2 + F16C)");
  m.def("avx512_enabled", [] { return dspark::avx512_enabled(); }, "whether the AVX-512 paths are in use");
  m.def(
      "set_avx512",
      [](bool on) {
        const bool was = dspark::avx512_enabled();
        dspark::avx512_enabled() = on && dspark::cpu_has_avx512();
        return was;
      },
      "use the AVX-512 paths where the CPU has them (same bits); returns the previous setting");
  m.def("rms_norm_rows", &rms_norm_rows, "RMSNorm of each row (fp32)");
  m.def("block_attention", &block_attention, "attention of a few new tokens against their cache slot (fp32)");
  m.def("ragged_attention", &ragged_attention, "append and attend a ragged batch of short blocks (fp32)");
  m.def("draft_layers", &draft_layers, "the DSpark drafter's layers and final norm over blocks (fp32)");
  m.def("draft_context_append", &draft_context_append, "a DSpark drafter's new context keys/values (fp32)");
  m.def("markov_draw", &markov_draw, "the Markov head's left-to-right draw, greedy or sampled (fp32)");
}
