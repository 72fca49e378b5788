// Fused CPU Adam/AdamW over fp32 master weights, independent of torch headers.
#pragma once

#include <cstdint>
#include <string>

namespace zerokit {

enum class ElementType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct AdamHyperParams {
  double lr;
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  bool decoupled_weight_decay;  // true: AdamW, false: Adam with L2 added to the gradient
};

struct AdamTile {
  float* param;
  const void* grad;  // element type given by grad_type
  float* exp_avg;
  float* exp_avg_sq;
  void* low_precision_out;  // nullptr, or bf16/fp16 copy of the updated param
  int64_t numel;
  ElementType grad_type;
  ElementType out_type;  // ignored when low_precision_out is nullptr
};

// One Adam step (step >= 1) over a tile, split across num_threads OpenMP threads
// (num_threads <= 0 uses the OpenMP default). The gradient is first multiplied by grad_scale in
// fp32 (gradient clipping's coefficient: the product grad.mul_(grad_scale) gives for fp32
// gradients, without a pass of its own). simd_level "" picks the best this CPU supports;
// "default", "avx2" or "avx512" force one (tests use it to cover every path).
void adam_step(const AdamTile& tile, int64_t step, const AdamHyperParams& hp, int num_threads,
               const std::string& simd_level = "", float grad_scale = 1.0f);

// Name of the instruction set the kernel dispatches to on this CPU ("avx512", "avx2", "default").
const char* adam_simd_level();

}  // namespace zerokit
