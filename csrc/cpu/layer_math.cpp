// The per-ISA copies of layer_math.inc: the same source, vectorized for each instruction set. Each copy
// lives in a namespace of its own (so the linker never merges them) and is compiled under its target.
#include <cstdint>

#include "layer.h"

namespace cee_cpu {

namespace math_scalar {
#include "layer_math.inc"
}  // namespace math_scalar

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace math_avx2 {
#include "layer_math.inc"
}  // namespace math_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace math_avx512 {
#include "layer_math.inc"
}  // namespace math_avx512
#pragma GCC pop_options
#endif

Math layer_math(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  if (isa == Isa::kAvx512) return math_avx512::table();
  if (isa == Isa::kAvx2) return math_avx2::table();
#endif
  (void)isa;
  return math_scalar::table();
}

}  // namespace cee_cpu
