// AVX2 + FMA + F16C kernels: 8 fp32 lanes along K, 16 vector registers.
//
// Same tiling as linear_avx512.cpp. 4-bit blocks use the F16C trick: a nibble q zero-extended to 16
// bits is, read as an fp16 bit pattern, the subnormal q * 2^-24, which vcvtph2ps converts exactly;
// one FMA with d * 2^24 (a power-of-two rescale, exact) and m (q4_1) or -8d (q4_0) then gives
// gguf-py's weight exactly (d*q is exact, so one rounding of d*q + m equals its two).
#include <immintrin.h>

#include <algorithm>

#include "linear.h"

#define CEE_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace cee_cpu {
namespace {

constexpr int64_t kQK = 32;

// Software prefetch into L2 of the bytes this far ahead of a tile, in address order: see
// linear_avx512.cpp (a tile's side-by-side rows defeat the hardware prefetchers).
inline int64_t prefetch_distance(int64_t tile_bytes) { return std::max<int64_t>(16384, 2 * tile_bytes); }

CEE_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

CEE_AVX2 inline float h2f(uint16_t h) { return _cvtsh_ss(h); }

template <int R, int MT>
CEE_AVX2 inline void store_tile(const Problem& p, int64_t n, int64_t m0, __m256 (&acc)[R][MT]) {
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const float b = p.bias ? p.bias[n + r] : 0.0f;
#pragma GCC unroll 16
    for (int i = 0; i < MT; ++i) p.y[(m0 + i) * p.ldy + n + r] = hsum(acc[r][i]) + b;
  }
}

// Lanes [0, k_left) of a vector: a mask for maskload.
CEE_AVX2 inline __m256i tail_mask(int64_t k_left) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(k_left)), lane);
}

// ---- fp32 ----

template <int R, int MT>
CEE_AVX2 void f32_tile(const Problem& p, int64_t n, int64_t m0) {
  __m256 acc[R][MT];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int i = 0; i < MT; ++i) acc[r][i] = _mm256_setzero_ps();
  const float* w = p.w + n * p.K;
  const float* x = p.x + m0 * p.ldx;
  const char* ahead = reinterpret_cast<const char*>(w) + prefetch_distance(R * p.K * 4);
  int64_t k = 0;
  for (; k + 8 <= p.K; k += 8) {
    __m256 wv[R];
    if (k % 16 == 0) {
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) _mm_prefetch(ahead + (k / 16 * R + r) * 64, _MM_HINT_T1);
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) wv[r] = _mm256_loadu_ps(w + r * p.K + k);
#pragma GCC unroll 16
    for (int i = 0; i < MT; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + i * p.ldx + k);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[r][i] = _mm256_fmadd_ps(wv[r], xv, acc[r][i]);
    }
  }
  if (k < p.K) {
    const __m256i mask = tail_mask(p.K - k);
    __m256 wv[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) wv[r] = _mm256_maskload_ps(w + r * p.K + k, mask);
#pragma GCC unroll 16
    for (int i = 0; i < MT; ++i) {
      const __m256 xv = _mm256_maskload_ps(x + i * p.ldx + k, mask);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[r][i] = _mm256_fmadd_ps(wv[r], xv, acc[r][i]);
    }
  }
  store_tile<R, MT>(p, n, m0, acc);
}

template <int MT>
CEE_AVX2 void f32_pass(const Problem& p, int64_t n0, int64_t n1, int64_t m0) {
  constexpr int R = MT <= 2 ? 4 : MT == 3 ? 3 : MT <= 6 ? 2 : 1;  // R*MT sums + R weights + 1 x <= 16
  int64_t n = n0;
  for (; n + R <= n1; n += R) f32_tile<R, MT>(p, n, m0);
  for (; n < n1; ++n) f32_tile<1, MT>(p, n, m0);
}

// ---- GGUF blocks ----

// Block b of row n, ready to give its 32 weights 8 at a time, each exactly dequantized.
template <Fmt F>
struct Block {
  __m256i lo, hi;  // 4-bit: 16 x u16 low / high nibbles; q8_0: lo = the 32 int8 quants, hi unused
  __m256 d, m;     // 4-bit: d * 2^24 and m (q4_1) or -8d (q4_0); q8_0: d

  Block() = default;
  CEE_AVX2 inline Block(const Problem& p, int64_t n, int64_t b) {
    const int64_t nb = p.K / kQK;
    const float df = h2f(p.d[n * nb + b]);
    if constexpr (F == Fmt::kQ8_0) {
      lo = _mm256_loadu_si256((const __m256i*)(static_cast<const int8_t*>(p.qs) + n * p.K + b * kQK));
      hi = lo;
      d = _mm256_set1_ps(df);
      m = d;
    } else {
      const uint8_t* q = static_cast<const uint8_t*>(p.qs) + n * (p.K / 2) + b * 16;
      const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)q));
      lo = _mm256_and_si256(bytes, _mm256_set1_epi16(0x0f));  // weights 0..15
      hi = _mm256_srli_epi16(bytes, 4);                        // weights 16..31
      d = _mm256_set1_ps(df * 16777216.0f);                    // d * 2^24, exact
      m = _mm256_set1_ps(F == Fmt::kQ4_1 ? h2f(p.m[n * nb + b]) : -8.0f * df);
    }
  }

  // Weights 8c .. 8c+7.
  template <int C>
  CEE_AVX2 inline __m256 weights() const {
    if constexpr (F == Fmt::kQ8_0) {
      const __m128i q = C < 2 ? _mm256_castsi256_si128(lo) : _mm256_extracti128_si256(lo, 1);
      const __m128i q8 = C % 2 == 0 ? q : _mm_unpackhi_epi64(q, q);
      return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)), d);
    } else {
      const __m256i& v = C < 2 ? lo : hi;
      const __m128i h = C % 2 == 0 ? _mm256_castsi256_si128(v) : _mm256_extracti128_si256(v, 1);
      return _mm256_fmadd_ps(_mm256_cvtph_ps(h), d, m);  // (q * 2^-24) * (d * 2^24) + m
    }
  }
};

template <Fmt F, int R, int MT, int C>
CEE_AVX2 inline void block_fmas(const Block<F> (&blk)[R], const float* xb, int64_t ldx, __m256 (&acc)[R][MT]) {
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const __m256 w = blk[r].template weights<C>();
#pragma GCC unroll 16
    for (int i = 0; i < MT; ++i) acc[r][i] = _mm256_fmadd_ps(_mm256_loadu_ps(xb + i * ldx + 8 * C), w, acc[r][i]);
  }
}

template <Fmt F, int R, int MT>
CEE_AVX2 void q_tile(const Problem& p, int64_t n, int64_t m0, int64_t ahead, int64_t rows_ahead) {
  const int64_t nb = p.K / kQK;
  __m256 acc[R][MT];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int i = 0; i < MT; ++i) acc[r][i] = _mm256_setzero_ps();
  const float* x = p.x + m0 * p.ldx;
  constexpr int64_t kBlockBytes = F == Fmt::kQ8_0 ? 32 : 16;  // quants of one block
  const char* q_ahead = static_cast<const char*>(p.qs) + n * nb * kBlockBytes + ahead;
  for (int64_t b = 0; b < nb; ++b) {
    _mm_prefetch(q_ahead + b * R * kBlockBytes, _MM_HINT_T1);
    if constexpr (F == Fmt::kQ8_0) _mm_prefetch(q_ahead + b * R * kBlockBytes + 64, _MM_HINT_T1);
    if (b % 16 == 0) {
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(p.d + (n + r + rows_ahead) * nb + b), _MM_HINT_T1);
        if constexpr (F == Fmt::kQ4_1)
          _mm_prefetch(reinterpret_cast<const char*>(p.m + (n + r + rows_ahead) * nb + b), _MM_HINT_T1);
      }
    }
    Block<F> blk[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) blk[r] = Block<F>(p, n + r, b);
    const float* xb = x + b * kQK;
    block_fmas<F, R, MT, 0>(blk, xb, p.ldx, acc);
    block_fmas<F, R, MT, 1>(blk, xb, p.ldx, acc);
    block_fmas<F, R, MT, 2>(blk, xb, p.ldx, acc);
    block_fmas<F, R, MT, 3>(blk, xb, p.ldx, acc);
  }
  store_tile<R, MT>(p, n, m0, acc);
}

template <Fmt F, int MT>
CEE_AVX2 void q_pass(const Problem& p, int64_t n0, int64_t n1, int64_t m0) {
  constexpr int R = MT == 1 ? 4 : MT <= 4 ? 2 : 1;  // R*MT sums + R blocks (2-4 registers each) <= 16
  int64_t n = n0;
  const int64_t row_bytes = F == Fmt::kQ8_0 ? p.K : p.K / 2;
  const int64_t ahead = prefetch_distance(R * row_bytes);
  for (; n + R <= n1; n += R) q_tile<F, R, MT>(p, n, m0, ahead, ahead / row_bytes);
  for (; n < n1; ++n) q_tile<F, 1, MT>(p, n, m0, ahead, ahead / row_bytes);
}

template <Fmt F>
CEE_AVX2 void rows(const Problem& p, int64_t n0, int64_t n1) {
  for (int64_t nt = n0; nt < n1; nt += kRowAlign) {
    const int64_t ne = std::min(nt + kRowAlign, n1);
    for (int64_t m0 = 0; m0 < p.M;) {
      const int64_t mt = std::min<int64_t>(p.M - m0, 8);
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

Kernel avx2_kernel(Fmt fmt) {
  switch (fmt) {
    case Fmt::kF32: return &rows<Fmt::kF32>;
    case Fmt::kQ8_0: return &rows<Fmt::kQ8_0>;
    case Fmt::kQ4_0: return &rows<Fmt::kQ4_0>;
    case Fmt::kQ4_1: return &rows<Fmt::kQ4_1>;
  }
  return nullptr;
}

}  // namespace cee_cpu
