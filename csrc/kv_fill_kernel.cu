// Fused KV-cache copy-forward for early-exit decoding, all skipped layers in one launch.
//
// For each entry n (an exited token: cache row, slot, exit layer e_n) and each layer j >= e_n:
//   x = h_n / rms(h_n)           (propagate; the RMSNorm weight g_j is folded into W^j by the caller)
//   k = RoPE(W_k^j x + b_k^j),  v = W_v^j x + b_v^j,  written at cache[j][row, :, slot, :].
// At batch 1 this is a GEMV over the stacked K/V weights of the skipped layers, bound by reading
// them: each warp computes one rotate-half *pair* of output rows (i, i + hd/2) of one layer, so RoPE
// needs no exchange between warps, reading both weight rows once with 16-byte loads and
// accumulating in fp32 for up to CHUNK entries at a time. The reference twin is
// cee_gen/ops/reference.py; tests/test_ops.py compares them.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kv_fill.h"

namespace cee_gen {
namespace {

constexpr int kWarps = 8;  // warps per block; a block also computes the rms of up to kWarps entries

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// grid.x: (L - first) layers x ceil(KV / kWarps) pair groups; grid.y: ceil(N / CHUNK) entry chunks.
template <typename T, int CHUNK, bool VEC>
__global__ void __launch_bounds__(kWarps * 32) kv_fill_kernel(const FillParams p) {
  static_assert(CHUNK <= kWarps, "one warp computes the rms of one entry");
  const int kv = p.n_kv_heads * p.head_dim;
  const int half = p.head_dim / 2;
  const int groups = (kv + kWarps - 1) / kWarps;  // kv pairs per layer: kv/2 for K, kv/2 for V
  const int j = p.first + blockIdx.x / groups;
  const int pair = (blockIdx.x % groups) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int n0 = blockIdx.y * CHUNK;

  bool active[CHUNK];  // which entries of the chunk write layer j
  bool any = false;
#pragma unroll
  for (int c = 0; c < CHUNK; ++c) {
    active[c] = n0 + c < p.n && (p.exit_layer == nullptr || p.exit_layer[n0 + c] <= j);
    any |= active[c];
  }
  if (!any) return;  // the same for every thread of the block: safe before __syncthreads

  const T* h = static_cast<const T*>(p.h);
  __shared__ float inv_rms[CHUNK];
  const int warp = threadIdx.x / 32;
  if (warp < CHUNK) {
    float s = 1.f;
    if (p.normalize && n0 + warp < p.n) {
      const T* x = h + static_cast<int64_t>(n0 + warp) * p.dim;
      float acc = 0.f;
      for (int d = lane; d < p.dim; d += 32) {
        const float f = to_float(x[d]);
        acc += f * f;
      }
      s = rsqrtf(warp_sum(acc) / p.dim + p.eps);
    }
    if (lane == 0) inv_rms[warp] = s;
  }
  __syncthreads();
  if (pair >= kv) return;

  const bool is_k = pair < kv / 2;
  const int q = is_k ? pair : pair - kv / 2;
  const int head = q / half, i = q % half;
  const int r0 = (is_k ? 0 : kv) + head * p.head_dim + i;  // rows r0 and r0 + half of layer j
  const T* w0 = static_cast<const T*>(p.w) + (static_cast<int64_t>(j) * 2 * kv + r0) * p.dim;
  const T* w1 = w0 + static_cast<int64_t>(half) * p.dim;

  float acc0[CHUNK], acc1[CHUNK];
#pragma unroll
  for (int c = 0; c < CHUNK; ++c) acc0[c] = acc1[c] = 0.f;
  if constexpr (VEC) {
    constexpr int E = 16 / sizeof(T);  // elements per 16-byte load
#pragma unroll 4
    for (int d = lane * E; d < p.dim; d += 32 * E) {
      const uint4 a = *reinterpret_cast<const uint4*>(w0 + d);
      const uint4 b = *reinterpret_cast<const uint4*>(w1 + d);
      const T* ta = reinterpret_cast<const T*>(&a);
      const T* tb = reinterpret_cast<const T*>(&b);
#pragma unroll
      for (int c = 0; c < CHUNK; ++c) {
        if (!active[c]) continue;
        const uint4 xv = *reinterpret_cast<const uint4*>(h + static_cast<int64_t>(n0 + c) * p.dim + d);
        const T* tx = reinterpret_cast<const T*>(&xv);
#pragma unroll
        for (int e = 0; e < E; ++e) {
          const float xf = to_float(tx[e]);
          acc0[c] = fmaf(to_float(ta[e]), xf, acc0[c]);
          acc1[c] = fmaf(to_float(tb[e]), xf, acc1[c]);
        }
      }
    }
  } else {
    for (int d = lane; d < p.dim; d += 32) {
      const float a = to_float(w0[d]), b = to_float(w1[d]);
#pragma unroll
      for (int c = 0; c < CHUNK; ++c) {
        if (!active[c]) continue;
        const float xf = to_float(h[static_cast<int64_t>(n0 + c) * p.dim + d]);
        acc0[c] = fmaf(a, xf, acc0[c]);
        acc1[c] = fmaf(b, xf, acc1[c]);
      }
    }
  }

  const T* bias = static_cast<const T*>(p.bias);
  const T* cos = static_cast<const T*>(p.cos);
  const T* sin = static_cast<const T*>(p.sin);
#pragma unroll
  for (int c = 0; c < CHUNK; ++c) {
    const float s0 = warp_sum(acc0[c]), s1 = warp_sum(acc1[c]);  // every lane joins the shuffles
    if (lane != c || !active[c]) continue;
    const int n = n0 + c;
    float y0 = s0 * inv_rms[c], y1 = s1 * inv_rms[c];
    if (bias != nullptr) {
      y0 += to_float(bias[static_cast<int64_t>(j) * 2 * kv + r0]);
      y1 += to_float(bias[static_cast<int64_t>(j) * 2 * kv + r0 + half]);
    }
    const int64_t at =
        ((p.rows[n] * p.n_kv_heads + head) * static_cast<int64_t>(p.n_slots) + p.slots[n]) * p.head_dim;
    T* out = static_cast<T*>(is_k ? p.k[j] : p.v[j]) + at;
    if (is_k) {  // rotate-half RoPE: (x_i, x_{i+half}) -> (x_i c_i - x_{i+half} s_i, x_{i+half} c' + x_i s')
      const int64_t r = static_cast<int64_t>(n) * p.head_dim;
      const float c0 = to_float(cos[r + i]), c1 = to_float(cos[r + i + half]);
      const float sn0 = to_float(sin[r + i]), sn1 = to_float(sin[r + i + half]);
      const float k0 = y0 * c0 - y1 * sn0, k1 = y1 * c1 + y0 * sn1;
      y0 = k0;
      y1 = k1;
    }
    out[i] = from_float<T>(y0);
    out[i + half] = from_float<T>(y1);
  }
}

// grid: (L - first, N). Entry n's K/V at layer e - 1 (e = max(exit_layer[n], first)) -> layer j.
template <typename T>
__global__ void kv_copy_kernel(const CopyParams p) {
  const int n = blockIdx.y, j = p.first + blockIdx.x;
  const int e = p.exit_layer == nullptr ? p.first : max(static_cast<int>(p.exit_layer[n]), p.first);
  if (j < e) return;
  const int width = p.n_kv_heads * p.head_dim;
  for (int t = threadIdx.x; t < width; t += blockDim.x) {
    const int head = t / p.head_dim, d = t % p.head_dim;
    const int64_t at =
        ((p.rows[n] * p.n_kv_heads + head) * static_cast<int64_t>(p.n_slots) + p.slots[n]) * p.head_dim + d;
    static_cast<T*>(p.k[j])[at] = static_cast<const T*>(p.k[e - 1])[at];
    static_cast<T*>(p.v[j])[at] = static_cast<const T*>(p.v[e - 1])[at];
  }
}

template <typename T, int CHUNK>
cudaError_t launch_chunk(const FillParams& p, bool vec, cudaStream_t stream) {
  const int kv = p.n_kv_heads * p.head_dim;
  const dim3 grid((p.n_layers - p.first) * ((kv + kWarps - 1) / kWarps), (p.n + CHUNK - 1) / CHUNK);
  if (vec)
    kv_fill_kernel<T, CHUNK, true><<<grid, kWarps * 32, 0, stream>>>(p);
  else
    kv_fill_kernel<T, CHUNK, false><<<grid, kWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const FillParams& p, bool vec, cudaStream_t stream) {
  if (p.n <= 1) return launch_chunk<T, 1>(p, vec, stream);
  if (p.n <= 2) return launch_chunk<T, 2>(p, vec, stream);
  if (p.n <= 4) return launch_chunk<T, 4>(p, vec, stream);
  return launch_chunk<T, 8>(p, vec, stream);
}

}  // namespace

cudaError_t launch_kv_fill(const FillParams& p, DType dtype, bool vectorized, cudaStream_t stream) {
  if (p.n == 0 || p.first >= p.n_layers) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return launch_typed<float>(p, vectorized, stream);
    case DType::kFloat16: return launch_typed<__half>(p, vectorized, stream);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16>(p, vectorized, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_kv_copy(const CopyParams& p, int element_size, cudaStream_t stream) {
  if (p.n == 0 || p.first >= p.n_layers) return cudaSuccess;
  const dim3 grid(p.n_layers - p.first, p.n);
  const int threads = min(256, ((p.n_kv_heads * p.head_dim + 31) / 32) * 32);
  if (element_size == 4)
    kv_copy_kernel<float><<<grid, threads, 0, stream>>>(p);
  else if (element_size == 2)
    kv_copy_kernel<uint16_t><<<grid, threads, 0, stream>>>(p);
  else
    return cudaErrorInvalidValue;
  return cudaGetLastError();
}

}  // namespace cee_gen
