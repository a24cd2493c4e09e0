// The per-row math of one decoder layer (layer_math.inc), one table of functions per instruction set.
#pragma once

#include <cstdint>

#include "linear.h"

namespace cee_cpu {

constexpr int64_t kMaxGroup = 64;  // query heads per KV head that attend() takes at once

struct Math {
  // y (D,) = w * x * rsqrt(mean(x^2) + eps)
  void (*rmsnorm)(const float* x, const float* w, float* y, int64_t D, float eps);
  // x (hd,) in place: x * cos + rotate_half(x) * sin
  void (*rope)(float* x, const float* cos, const float* sin, int64_t hd);
  // for the G <= kMaxGroup query heads q (G, hd) of one KV head: out (G, hd) = softmax(scale * q K^T
  // over the slots s < S with mask[s * mstride]) V; K, V (S, hd); scores: G * S floats
  void (*attend)(const float* q, const float* K, const float* V, const bool* mask, int64_t mstride,
                 int64_t S, int64_t hd, int64_t G, float scale, float* scores, float* out);
  // out (n,) = silu(gate) * up
  void (*silu_mul)(const float* gate, const float* up, float* out, int64_t n);
  // y (n,) = a + b
  void (*add)(const float* a, const float* b, float* y, int64_t n);
};

Math layer_math(Isa isa);

}  // namespace cee_cpu
