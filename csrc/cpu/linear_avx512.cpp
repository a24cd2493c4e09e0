// AVX-512 (F, BW, VL, DQ) kernels: 16 fp32 lanes along K.
//
// A tile is R weight rows x MT activation rows, its R*MT sums in registers; each weight vector is
// loaded (and dequantized) once and used for MT FMAs, so W is read once however many rows x has.
//
// 4-bit blocks: the 16 values one block's nibbles can take are a 16-float table, d*iota + m (q4_1) or
// d*(iota - 8) (q4_0), built with one FMA per block; vpermps, which reads only the low 4 bits of each
// index lane, then looks up all 16 low nibbles of the zero-extended bytes at once, and all 16 high
// nibbles after a shift. The table holds exactly gguf-py's fp32 weights (d*q is exact, so
// fl(d*q + m) = fl(fl(d*q) + m)), so no per-block rescaling follows and no activation is quantized.
// q8_0: sign-extend, convert, multiply by d (exact) and FMA.
#include <immintrin.h>

#include <algorithm>

#include "linear.h"

#define CEE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))

namespace cee_cpu {
namespace {

constexpr int64_t kQK = 32;

// A tile reads its R rows side by side, which the hardware prefetchers follow poorly (half the
// bandwidth of one sequential stream, measured on Zen 4); so each tile also prefetches into L2, in
// address order, the bytes that lie this far ahead of it: the tiles after next.
inline int64_t prefetch_distance(int64_t tile_bytes) { return std::max<int64_t>(16384, 2 * tile_bytes); }

template <int R, int MT>
CEE_AVX512 inline void store_tile(const Problem& p, int64_t n, int64_t m0, __m512 (&acc)[R][MT]) {
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const float b = p.bias ? p.bias[n + r] : 0.0f;
#pragma GCC unroll 16
    for (int i = 0; i < MT; ++i) p.y[(m0 + i) * p.ldy + n + r] = _mm512_reduce_add_ps(acc[r][i]) + b;
  }
}

// ---- fp32 ----

template <int R, int MT>
CEE_AVX512 void f32_tile(const Problem& p, int64_t n, int64_t m0) {
  __m512 acc[R][MT];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int i = 0; i < MT; ++i) acc[r][i] = _mm512_setzero_ps();
  const float* w = p.w + n * p.K;
  const float* x = p.x + m0 * p.ldx;
  const char* ahead = reinterpret_cast<const char*>(w) + prefetch_distance(R * p.K * 4);
  int64_t k = 0;
  for (; k + 16 <= p.K; k += 16) {
    __m512 wv[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(ahead + (k / 16 * R + r) * 64, _MM_HINT_T1);  // the tile's bytes, in order
      wv[r] = _mm512_loadu_ps(w + r * p.K + k);
    }
#pragma GCC unroll 16
    for (int i = 0; i < MT; ++i) {
      const __m512 xv = _mm512_loadu_ps(x + i * p.ldx + k);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[r][i] = _mm512_fmadd_ps(wv[r], xv, acc[r][i]);
    }
  }
  if (k < p.K) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (p.K - k)) - 1u);
    __m512 wv[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) wv[r] = _mm512_maskz_loadu_ps(mask, w + r * p.K + k);
#pragma GCC unroll 16
    for (int i = 0; i < MT; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + i * p.ldx + k);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[r][i] = _mm512_fmadd_ps(wv[r], xv, acc[r][i]);
    }
  }
  store_tile<R, MT>(p, n, m0, acc);
}

template <int MT>
CEE_AVX512 void f32_pass(const Problem& p, int64_t n0, int64_t n1, int64_t m0) {
  // R*MT sums + R weights + 1 x within 32 registers; each x load feeds R FMAs (loads, not FMAs, would
  // otherwise bound the loop, the more so when x spills out of L1).
  constexpr int R = MT <= 4 ? 4 : 3;
  int64_t n = n0;
  for (; n + R <= n1; n += R) f32_tile<R, MT>(p, n, m0);
  for (; n < n1; ++n) f32_tile<1, MT>(p, n, m0);
}

// ---- GGUF blocks ----

// Prefetch distance of a q_tile: in bytes of the quants, and in rows for the scales.
struct Ahead {
  int64_t bytes, rows;
};

template <Fmt F, int R>
Ahead q_ahead(const Problem& p) {
  const int64_t row_bytes = F == Fmt::kQ8_0 ? p.K : p.K / 2;
  const int64_t bytes = prefetch_distance(R * row_bytes);
  return {bytes, bytes / row_bytes};
}

template <Fmt F, int R, int MT>
CEE_AVX512 void q_tile(const Problem& p, int64_t n, int64_t m0, Ahead ah) {
  const int64_t nb = p.K / kQK;
  __m512 acc[R][MT];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int i = 0; i < MT; ++i) acc[r][i] = _mm512_setzero_ps();
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 iota8 = _mm512_sub_ps(iota, _mm512_set1_ps(8.0f));
  alignas(64) float dbuf[R][16];
  alignas(64) float mbuf[R][16];
  const float* x = p.x + m0 * p.ldx;
  constexpr int64_t kBlockBytes = F == Fmt::kQ8_0 ? 32 : 16;  // quants of one block
  const char* q_ahead = static_cast<const char*>(p.qs) + n * nb * kBlockBytes + ah.bytes;
  const int64_t rows_ahead = ah.rows;
  for (int64_t g = 0; g < nb; g += 16) {  // 16 blocks' scales converted at once
    const int64_t cnt = std::min<int64_t>(16, nb - g);
    const __mmask16 mask = static_cast<__mmask16>((1u << cnt) - 1u);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(p.d + (n + r + rows_ahead) * nb + g), _MM_HINT_T1);
      if constexpr (F == Fmt::kQ4_1)
        _mm_prefetch(reinterpret_cast<const char*>(p.m + (n + r + rows_ahead) * nb + g), _MM_HINT_T1);
      _mm512_store_ps(dbuf[r], _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p.d + (n + r) * nb + g)));
      if constexpr (F == Fmt::kQ4_1)
        _mm512_store_ps(mbuf[r], _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p.m + (n + r) * nb + g)));
    }
    for (int64_t j = 0; j < cnt; ++j) {
      const int64_t b = g + j;
      // the tile's R * (16 or 32) bytes of this block lie at b * R * (16 or 32) in its prefetch order
      _mm_prefetch(q_ahead + b * R * kBlockBytes, _MM_HINT_T1);
      if constexpr (F == Fmt::kQ8_0) _mm_prefetch(q_ahead + b * R * kBlockBytes + 64, _MM_HINT_T1);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m512 dv = _mm512_set1_ps(dbuf[r][j]);
        __m512 w0, w1;
        if constexpr (F == Fmt::kQ8_0) {
          const int8_t* q = static_cast<const int8_t*>(p.qs) + (n + r) * p.K + b * kQK;
          w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)q))), dv);
          w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q + 16)))),
                             dv);
        } else {
          const uint8_t* q = static_cast<const uint8_t*>(p.qs) + (n + r) * (p.K / 2) + b * 16;
          const __m512 table = F == Fmt::kQ4_1 ? _mm512_fmadd_ps(iota, dv, _mm512_set1_ps(mbuf[r][j]))
                                               : _mm512_mul_ps(iota8, dv);
          const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)q));
          w0 = _mm512_permutexvar_ps(bytes, table);                         // low nibbles: weights 0..15
          w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);   // high: weights 16..31
        }
#pragma GCC unroll 16
        for (int i = 0; i < MT; ++i) {
          const float* xb = x + i * p.ldx + b * kQK;
          acc[r][i] = _mm512_fmadd_ps(_mm512_loadu_ps(xb), w0, acc[r][i]);
          acc[r][i] = _mm512_fmadd_ps(_mm512_loadu_ps(xb + 16), w1, acc[r][i]);
        }
      }
    }
  }
  store_tile<R, MT>(p, n, m0, acc);
}

template <Fmt F, int MT>
CEE_AVX512 void q_pass(const Problem& p, int64_t n0, int64_t n1, int64_t m0) {
  // R*MT sums + 2R weights + R tables within 32 registers; enough independent FMA chains at MT = 1.
  constexpr int R = MT <= 2 ? 4 : MT <= 4 ? 3 : 2;
  int64_t n = n0;
  const Ahead ah = q_ahead<F, R>(p);
  for (; n + R <= n1; n += R) q_tile<F, R, MT>(p, n, m0, ah);
  for (; n < n1; ++n) q_tile<F, 1, MT>(p, n, m0, q_ahead<F, 1>(p));
}

// M is cut into passes of 8 and what is left (1..7): one instantiation per pass size. The passes over a
// kRowAlign-row weight tile run back to back, so the tile is read from memory once.
template <Fmt F>
CEE_AVX512 void rows(const Problem& p, int64_t n0, int64_t n1) {
  for (int64_t nt = n0; nt < n1; nt += kRowAlign) {
    const int64_t ne = std::min(nt + kRowAlign, n1);
    for (int64_t m0 = 0; m0 < p.M;) {
      const int64_t left = p.M - m0;
      const int64_t mt = std::min<int64_t>(left, 8);
      if constexpr (F == Fmt::kF32) {
        switch (mt) {
          case 1: f32_pass<1>(p, nt, ne, m0); break;
          case 2: f32_pass<2>(p, nt, ne, m0); break;
          case 3: f32_pass<3>(p, nt, ne, m0); break;
          case 4: f32_pass<4>(p, nt, ne, m0); break;
          case 5: f32_pass<5>(p, nt, ne, m0); break;
          case 6: f32_pass<6>(p, nt, ne, m0); break;
          case 7: f32_pass<7>(p, nt, ne, m0); break;
          default: f32_pass<8>(p, nt, ne, m0); break;
        }
      } else {
        switch (mt) {
          case 1: q_pass<F, 1>(p, nt, ne, m0); break;
          case 2: q_pass<F, 2>(p, nt, ne, m0); break;
          case 3: q_pass<F, 3>(p, nt, ne, m0); break;
          case 4: q_pass<F, 4>(p, nt, ne, m0); break;
          case 5: q_pass<F, 5>(p, nt, ne, m0); break;
          case 6: q_pass<F, 6>(p, nt, ne, m0); break;
          case 7: q_pass<F, 7>(p, nt, ne, m0); break;
          default: q_pass<F, 8>(p, nt, ne, m0); break;
        }
      }
      m0 += mt;
    }
  }
}

}  // namespace

Kernel avx512_kernel(Fmt fmt) {
  switch (fmt) {
    case Fmt::kF32: return &rows<Fmt::kF32>;
    case Fmt::kQ8_0: return &rows<Fmt::kQ8_0>;
    case Fmt::kQ4_0: return &rows<Fmt::kQ4_0>;
    case Fmt::kQ4_1: return &rows<Fmt::kQ4_1>;
  }
  return nullptr;
}

}  // namespace cee_cpu
