// Small-M CPU matmul kernels, y (M, N) = x (M, K) @ W^T (+ bias), shared by the per-ISA files.
//
// W is fp32 (N, K), or GGUF blocks of 32 weights repacked as separate arrays (cee_gen/ops/lowbit.py):
//   q8_0  qs int8 (N, K)        d fp16 (N, K/32)                 w = d * q
//   q4_0  qs uint8 (N, K/2)     d fp16 (N, K/32)                 w = d * (q - 8)
//   q4_1  qs uint8 (N, K/2)     d, m fp16 (N, K/32)              w = d * q + m
// where byte j of a 4-bit block (16 bytes) holds weight j in its low nibble and j+16 in its high one,
// as in GGUF. The kernels dequantize each block exactly (d*q is exact in fp32: an 11-bit significand
// times a 4- or 8-bit integer), so they compute with the very weights gguf-py's dequantization gives;
// only the order of the fp32 sums differs from a plain fp32 matmul. Activations stay fp32.
//
// The ISA files hold no torch headers (they compile in a second): each function carries its own
// __attribute__((target(...))), so every file builds with default flags and linear.cpp picks the
// variant at run time.
#pragma once

#include <cstdint>

namespace cee_cpu {

enum class Fmt : int { kF32 = 0, kQ8_0 = 1, kQ4_0 = 2, kQ4_1 = 3 };
enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

struct Problem {
  const float* x;      // (M, K), row stride ldx, unit stride along K
  int64_t ldx;
  float* y;            // (M, N), row stride ldy
  int64_t ldy;
  const float* bias;   // (N,) or nullptr
  int64_t M, N, K;
  const float* w;      // kF32: (N, K)
  const void* qs;      // quantized formats: int8 (N, K) or uint8 (N, K/2)
  const uint16_t* d;   // fp16 bits (N, K/32)
  const uint16_t* m;   // fp16 bits (N, K/32), q4_1 only
};

// Computes output columns [n0, n1) of y for all M rows. Threads split N on multiples of kRowAlign rows,
// a multiple of every tile height (1..4, 8), so only the last rows of W may need a narrower tile.
using Kernel = void (*)(const Problem& p, int64_t n0, int64_t n1);
constexpr int64_t kRowAlign = 24;

Kernel scalar_kernel(Fmt fmt);
// Rows [n0, n1) of a block-format W dequantized into out, (N, K) fp32 row-major (linear_scalar.cpp).
void dequant_rows(Fmt fmt, const Problem& p, int64_t n0, int64_t n1, float* out);
Kernel kernel_for(Fmt fmt);  // the variant of the ISA in use (linear.cpp)
Isa current_isa();
Kernel avx2_kernel(Fmt fmt);
Kernel avx512_kernel(Fmt fmt);

// IEEE half bits -> float, exact (subnormals included), for the scalar paths.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalize
    int e = -1;
    do { ++e; man <<= 1; } while ((man & 0x400u) == 0);
    bits = sign | ((112u - e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  __builtin_memcpy(&f, &bits, sizeof f);
  return f;
}

}  // namespace cee_cpu
