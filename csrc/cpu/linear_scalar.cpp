// Plain C++ kernels: the fallback for CPUs without AVX2/FMA/F16C, and the reading of the formats.
//
// Each block is dequantized into 32 floats (exactly, see linear.h), then dotted with every x row; the
// compiler may vectorize the loops with the baseline ISA (SSE2 on x86-64).
#include <algorithm>

#include "linear.h"

namespace cee_cpu {
namespace {

constexpr int64_t kQK = 32;  // weights per block

inline void store(const Problem& p, int64_t n, int64_t mi, float acc) {
  p.y[mi * p.ldy + n] = acc + (p.bias ? p.bias[n] : 0.0f);
}

void f32_rows(const Problem& p, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* w = p.w + n * p.K;
    for (int64_t mi = 0; mi < p.M; ++mi) {
      const float* x = p.x + mi * p.ldx;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // 8 partial sums: vectorizable, and fewer rounding steps
      int64_t k = 0;
      for (; k + 8 <= p.K; k += 8)
        for (int j = 0; j < 8; ++j) acc[j] += x[k + j] * w[k + j];
      for (; k < p.K; ++k) acc[0] += x[k] * w[k];
      store(p, n, mi, ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])));
    }
  }
}

// Dequantizes block b of row n into out[32].
template <Fmt F>
inline void dequant_block(const Problem& p, int64_t n, int64_t b, float* out) {
  const int64_t nb = p.K / kQK;
  const float d = half_to_float(p.d[n * nb + b]);
  if constexpr (F == Fmt::kQ8_0) {
    const int8_t* q = static_cast<const int8_t*>(p.qs) + n * p.K + b * kQK;
    for (int j = 0; j < 32; ++j) out[j] = d * static_cast<float>(q[j]);
  } else {
    const uint8_t* q = static_cast<const uint8_t*>(p.qs) + n * (p.K / 2) + b * 16;
    if constexpr (F == Fmt::kQ4_1) {
      const float m = half_to_float(p.m[n * nb + b]);
      for (int j = 0; j < 16; ++j) {
        out[j] = d * static_cast<float>(q[j] & 15) + m;
        out[j + 16] = d * static_cast<float>(q[j] >> 4) + m;
      }
    } else {
      for (int j = 0; j < 16; ++j) {
        out[j] = d * static_cast<float>((q[j] & 15) - 8);
        out[j + 16] = d * static_cast<float>((q[j] >> 4) - 8);
      }
    }
  }
}

template <Fmt F>
void quant_rows(const Problem& p, int64_t n0, int64_t n1) {
  constexpr int64_t kMT = 16;  // x rows per pass over a weight row (their sums live on the stack)
  const int64_t nb = p.K / kQK;
  float wb[32];
  float acc[kMT][8];
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m0 = 0; m0 < p.M; m0 += kMT) {
      const int64_t mt = std::min(kMT, p.M - m0);
      for (int64_t i = 0; i < mt; ++i)
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        dequant_block<F>(p, n, b, wb);
        for (int64_t i = 0; i < mt; ++i) {
          const float* x = p.x + (m0 + i) * p.ldx + b * kQK;
          for (int j = 0; j < 32; ++j) acc[i][j & 7] += x[j] * wb[j];
        }
      }
      for (int64_t i = 0; i < mt; ++i) {
        const float* a = acc[i];
        store(p, n, m0 + i, ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7])));
      }
    }
  }
}

template <Fmt F>
void dequant_rows_of(const Problem& p, int64_t n0, int64_t n1, float* out) {
  const int64_t nb = p.K / kQK;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t b = 0; b < nb; ++b) dequant_block<F>(p, n, b, out + n * p.K + b * kQK);
}

}  // namespace

void dequant_rows(Fmt fmt, const Problem& p, int64_t n0, int64_t n1, float* out) {
  switch (fmt) {
    case Fmt::kQ8_0: return dequant_rows_of<Fmt::kQ8_0>(p, n0, n1, out);
    case Fmt::kQ4_0: return dequant_rows_of<Fmt::kQ4_0>(p, n0, n1, out);
    case Fmt::kQ4_1: return dequant_rows_of<Fmt::kQ4_1>(p, n0, n1, out);
    case Fmt::kF32: break;
  }
}

Kernel scalar_kernel(Fmt fmt) {
  switch (fmt) {
    case Fmt::kF32: return &f32_rows;
    case Fmt::kQ8_0: return &quant_rows<Fmt::kQ8_0>;
    case Fmt::kQ4_0: return &quant_rows<Fmt::kQ4_0>;
    case Fmt::kQ4_1: return &quant_rows<Fmt::kQ4_1>;
  }
  return nullptr;
}

}  // namespace cee_cpu
