// Fused CPU Adam/AdamW.
//
// [Note: matching torch.optim]
// The update follows torch's single-tensor Adam operation by operation, in fp32, with the
// scalars derived in double exactly as torch derives them in Python. Where torch's CPU kernels
// fuse a multiply-add (lerp, addcmul, add with alpha) the kernel uses an explicit fma on CPUs
// that have one; everything else is compiled with -ffp-contract=off so the compiler cannot fuse
// other steps. The remaining difference is sqrt: this kernel's is correctly rounded, torch's may
// go through MKL's vector math, which can differ by one ulp.
//
// One pass reads grad/param/exp_avg/exp_avg_sq once and writes param/exp_avg/exp_avg_sq (and
// optionally a bf16/fp16 copy of the param) once. OpenMP splits the tile into chunks; each chunk
// runs a loop vectorised for the best instruction set of this CPU (chosen at run time).
#include "cpu_adam.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#if defined(_OPENMP)
#include <omp.h>
#endif

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define ZEROKIT_X86_DISPATCH 1
#else
#define ZEROKIT_X86_DISPATCH 0
#endif

#define ZEROKIT_INLINE inline __attribute__((always_inline))

namespace zerokit {
namespace {

// Elements per OpenMP work item: 64 KiB per fp32 array, so the five streams stay in L2.
constexpr int64_t kChunk = 16384;
// Below this, thread start-up costs more than it saves.
constexpr int64_t kParallelThreshold = 4 * kChunk;

// Per-step constants. Options are bit masks and a neutral factor rather than bools: a select on
// a scalar bool inside the loop stops GCC from vectorising it.
struct AdamScalars {
  float decay_factor;         // 1 - lr * weight_decay for AdamW, else 1 (x * 1.0f == x exactly)
  uint32_t l2_mask;           // all ones for Adam with weight decay: grad += weight_decay * param
  float l2;                   // weight_decay
  uint32_t lerp_small_mask;   // all ones when torch's lerp starts from exp_avg (weight < 0.5)
  float lerp_coeff;
  float beta2;
  float one_minus_beta2;
  float bias_correction2_sqrt;
  float eps;
  float neg_step_size;
  float grad_scale;  // 1 when there is nothing to scale (x * 1.0f == x exactly)
};

AdamScalars derive_scalars(int64_t step, const AdamHyperParams& hp, float grad_scale) {
  // Same expressions, in double, as torch.optim.adam._single_tensor_adam.
  const double steps = static_cast<double>(step);
  const double bias_correction1 = 1.0 - std::pow(hp.beta1, steps);
  const double bias_correction2 = 1.0 - std::pow(hp.beta2, steps);
  const double step_size = hp.lr / bias_correction1;
  const float lerp_weight = static_cast<float>(1.0 - hp.beta1);
  const bool decay = hp.weight_decay != 0.0;
  // torch's vectorised lerp: small weights start from exp_avg, large ones from grad.
  const bool lerp_weight_small = std::fabs(lerp_weight) < 0.5f;
  AdamScalars s{};
  s.decay_factor = decay && hp.decoupled_weight_decay ? static_cast<float>(1.0 - hp.lr * hp.weight_decay) : 1.0f;
  s.l2_mask = decay && !hp.decoupled_weight_decay ? ~0u : 0u;
  s.l2 = static_cast<float>(hp.weight_decay);
  s.lerp_small_mask = lerp_weight_small ? ~0u : 0u;
  s.lerp_coeff = lerp_weight_small ? lerp_weight : lerp_weight - 1.0f;
  s.beta2 = static_cast<float>(hp.beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - hp.beta2);
  s.bias_correction2_sqrt = static_cast<float>(std::pow(bias_correction2, 0.5));
  s.eps = static_cast<float>(hp.eps);
  s.neg_step_size = static_cast<float>(-step_size);
  s.grad_scale = grad_scale;
  return s;
}

ZEROKIT_INLINE uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

ZEROKIT_INLINE float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Conversions as c10::BFloat16 / c10::Half do them (round to nearest even). The fp16 ones are the
// FP16 library's algorithms, which c10 also uses. Selections are written as bit masks: GCC does
// not if-convert these ternaries, and a branch would stop the loop from vectorising.
ZEROKIT_INLINE uint32_t select(bool condition, uint32_t if_true, uint32_t if_false) {
  const uint32_t mask = 0u - static_cast<uint32_t>(condition);
  return (if_true & mask) | (if_false & ~mask);
}

ZEROKIT_INLINE float blend(uint32_t mask, float if_set, float if_clear) {
  return float_of((bits_of(if_set) & mask) | (bits_of(if_clear) & ~mask));
}

ZEROKIT_INLINE uint16_t bf16_from_float(float f) {
  const uint32_t u = bits_of(f);
  const bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(select(is_nan, 0x7FC0u, rounded));
}

ZEROKIT_INLINE float float_from_bf16(uint16_t h) { return float_of(static_cast<uint32_t>(h) << 16); }

ZEROKIT_INLINE uint16_t fp16_from_float(float f) {
  const float scale_to_inf = 0x1.0p+112f;
  const float scale_to_zero = 0x1.0p-110f;
  float base = (std::fabs(f) * scale_to_inf) * scale_to_zero;
  const uint32_t w = bits_of(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t bias = std::max(shl1_w & 0xFF000000u, 0x71000000u);
  base = float_of((bias >> 1) + 0x07800000u) + base;
  const uint32_t b = bits_of(base);
  const uint32_t exp_bits = (b >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = b & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return static_cast<uint16_t>((sign >> 16) | select(shl1_w > 0xFF000000u, 0x7E00u, nonsign));
}

ZEROKIT_INLINE float float_from_fp16(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = float_of((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = float_of((two_w >> 17) | (126u << 23)) - 0.5f;
  return float_of(sign | select(two_w < (1u << 27), bits_of(denormalized), bits_of(normalized)));
}

struct F32 {};
struct BF16 {};
struct F16 {};
struct NoOutput {};

template <typename T>
ZEROKIT_INLINE float load_grad(const void* data, int64_t i) {
  if constexpr (std::is_same_v<T, F32>) {
    return static_cast<const float*>(data)[i];
  } else if constexpr (std::is_same_v<T, BF16>) {
    return float_from_bf16(static_cast<const uint16_t*>(data)[i]);
  } else {
    return float_from_fp16(static_cast<const uint16_t*>(data)[i]);
  }
}

template <typename T>
ZEROKIT_INLINE void store_low_precision(void* data, int64_t i, float value) {
  if constexpr (std::is_same_v<T, BF16>) {
    static_cast<uint16_t*>(data)[i] = bf16_from_float(value);
  } else if constexpr (std::is_same_v<T, F16>) {
    static_cast<uint16_t*>(data)[i] = fp16_from_float(value);
  }
}

template <bool kFma>
ZEROKIT_INLINE float multiply_add(float a, float b, float c) {
  if constexpr (kFma) {
    return __builtin_fmaf(a, b, c);
  } else {
    return a * b + c;  // not fused: built with -ffp-contract=off
  }
}

template <bool kFma, typename GradT, typename OutT>
ZEROKIT_INLINE void adam_range(const AdamTile& t, const AdamScalars& s, int64_t begin, int64_t end) {
  float* __restrict param = t.param;
  float* __restrict exp_avg = t.exp_avg;
  float* __restrict exp_avg_sq = t.exp_avg_sq;
  const void* grad = t.grad;
  void* out = t.low_precision_out;
  // Locals, so the vectoriser sees loop invariants rather than loads that stores might alias.
  const float decay_factor = s.decay_factor, l2 = s.l2, lerp_coeff = s.lerp_coeff, beta2 = s.beta2;
  const uint32_t l2_mask = s.l2_mask, lerp_small_mask = s.lerp_small_mask;
  const float one_minus_beta2 = s.one_minus_beta2, bias_correction2_sqrt = s.bias_correction2_sqrt;
  const float eps = s.eps, neg_step_size = s.neg_step_size, grad_scale = s.grad_scale;
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    float g = load_grad<GradT>(grad, i) * grad_scale;      // clipping: grad.mul_(coefficient)
    float p = param[i];
    g = blend(l2_mask, multiply_add<kFma>(l2, p, g), g);  // grad = grad.add(param, alpha=wd)
    p = p * decay_factor;                                  // param.mul_(1 - lr * wd)
    float m = exp_avg[i];                                  // exp_avg.lerp_(grad, 1 - beta1)
    m = multiply_add<kFma>(lerp_coeff, g - m, blend(lerp_small_mask, m, g));
    float v = exp_avg_sq[i] * beta2;                       // exp_avg_sq.mul_(beta2)
    v = multiply_add<kFma>(one_minus_beta2 * g, g, v);     //   .addcmul_(grad, grad, 1 - beta2)
    const float denom = std::sqrt(v) / bias_correction2_sqrt + eps;
    p = p + (neg_step_size * m) / denom;                   // param.addcdiv_(exp_avg, denom, -lr / bc1)
    param[i] = p;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    store_low_precision<OutT>(out, i, p);
  }
}

using RangeKernel = void (*)(const AdamTile&, const AdamScalars&, int64_t, int64_t);

template <typename GradT, typename OutT>
void range_default(const AdamTile& t, const AdamScalars& s, int64_t begin, int64_t end) {
#if defined(__FMA__) || defined(__aarch64__)
  adam_range<true, GradT, OutT>(t, s, begin, end);
#else
  adam_range<false, GradT, OutT>(t, s, begin, end);
#endif
}

#if ZEROKIT_X86_DISPATCH
template <typename GradT, typename OutT>
__attribute__((target("avx2,fma,f16c"))) void range_avx2(const AdamTile& t, const AdamScalars& s, int64_t begin,
                                                          int64_t end) {
  adam_range<true, GradT, OutT>(t, s, begin, end);
}

template <typename GradT, typename OutT>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))) void range_avx512(
    const AdamTile& t, const AdamScalars& s, int64_t begin, int64_t end) {
  adam_range<true, GradT, OutT>(t, s, begin, end);
}
#endif

enum class SimdLevel { kDefault, kAvx2, kAvx512 };

SimdLevel detect_simd_level() {
#if ZEROKIT_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return SimdLevel::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return SimdLevel::kAvx2;
#endif
  return SimdLevel::kDefault;
}

SimdLevel cpu_simd_level() {
  static const SimdLevel level = detect_simd_level();
  return level;
}

template <typename GradT, typename OutT>
RangeKernel kernel_for_level(SimdLevel level) {
#if ZEROKIT_X86_DISPATCH
  if (level == SimdLevel::kAvx512) return &range_avx512<GradT, OutT>;
  if (level == SimdLevel::kAvx2) return &range_avx2<GradT, OutT>;
#endif
  (void)level;
  return &range_default<GradT, OutT>;
}

template <typename GradT>
RangeKernel kernel_for_output(const AdamTile& t, SimdLevel level) {
  if (t.low_precision_out == nullptr) return kernel_for_level<GradT, NoOutput>(level);
  switch (t.out_type) {
    case ElementType::kBFloat16:
      return kernel_for_level<GradT, BF16>(level);
    case ElementType::kFloat16:
      return kernel_for_level<GradT, F16>(level);
    default:
      throw std::invalid_argument("low-precision output must be bfloat16 or float16");
  }
}

RangeKernel select_kernel(const AdamTile& t, SimdLevel level) {
  switch (t.grad_type) {
    case ElementType::kFloat32:
      return kernel_for_output<F32>(t, level);
    case ElementType::kBFloat16:
      return kernel_for_output<BF16>(t, level);
    case ElementType::kFloat16:
      return kernel_for_output<F16>(t, level);
  }
  throw std::invalid_argument("gradient must be float32, bfloat16 or float16");
}

SimdLevel parse_simd_level(const std::string& name) {
  if (name.empty()) return cpu_simd_level();
  SimdLevel wanted;
  if (name == "default") {
    wanted = SimdLevel::kDefault;
  } else if (name == "avx2") {
    wanted = SimdLevel::kAvx2;
  } else if (name == "avx512") {
    wanted = SimdLevel::kAvx512;
  } else {
    throw std::invalid_argument("unknown SIMD level '" + name + "'; use '', 'default', 'avx2' or 'avx512'");
  }
  if (static_cast<int>(wanted) > static_cast<int>(cpu_simd_level())) {
    throw std::invalid_argument("SIMD level '" + name + "' is not supported by this CPU (best: " +
                                adam_simd_level() + ")");
  }
  return wanted;
}

}  // namespace

const char* adam_simd_level() {
  switch (cpu_simd_level()) {
    case SimdLevel::kAvx512:
      return "avx512";
    case SimdLevel::kAvx2:
      return "avx2";
    default:
      return "default";
  }
}

void adam_step(const AdamTile& tile, int64_t step, const AdamHyperParams& hp, int num_threads,
               const std::string& simd_level, float grad_scale) {
  if (step < 1) throw std::invalid_argument("Adam step must be >= 1, got " + std::to_string(step));
  const RangeKernel kernel = select_kernel(tile, parse_simd_level(simd_level));
  const AdamScalars scalars = derive_scalars(step, hp, grad_scale);
  const int64_t n = tile.numel;
  if (n < kParallelThreshold || num_threads == 1) {
    kernel(tile, scalars, 0, n);
    return;
  }
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#if defined(_OPENMP)
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
  for (int64_t c = 0; c < chunks; ++c) {
    kernel(tile, scalars, c * kChunk, std::min(n, (c + 1) * kChunk));
  }
}

}  // namespace zerokit
