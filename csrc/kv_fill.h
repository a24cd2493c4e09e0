// Fused KV-cache copy-forward: launch parameters shared by the binding (kv_fill.cpp) and the
// kernels (kv_fill_kernel.cu). Plain CUDA types only, so the kernels compile without torch headers.
// Semantics: cee_gen/ops/reference.py (kv_fill_ref, kv_copy_ref), the twin the kernels are tested
// against.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace cee_gen {

// Per-layer cache pointers travel in the kernel's parameters (2 x 128 x 8 = 2 KiB of the 4 KiB).
constexpr int kMaxLayers = 128;

enum class DType { kFloat32, kFloat16, kBFloat16 };

struct FillParams {
  const void* h;              // (N, D) exit hidden states
  const void* w;              // (L, 2*KV, D): per layer the K rows, then the V rows
  const void* bias;           // (L, 2*KV) or nullptr
  const void* cos;            // (N, hd) RoPE row of each entry, rotate-half layout
  const void* sin;            // (N, hd)
  const int64_t* rows;        // (N,) cache row of each entry
  const int64_t* slots;       // (N,) cache slot of each entry
  const int64_t* exit_layer;  // (N,) entry n writes layers [max(exit_layer[n], first), L); nullptr: all
                              // entries exit at first
  void* k[kMaxLayers];        // L caches (B, H_kv, S, hd), contiguous
  void* v[kMaxLayers];
  int n, dim, n_layers, first, n_kv_heads, head_dim, n_slots;
  float eps;
  bool normalize;             // x = h / rms(h) (RMSNorm weight folded into w), else x = h
};

struct CopyParams {
  const int64_t* rows;
  const int64_t* slots;
  const int64_t* exit_layer;  // or nullptr, as in FillParams
  void* k[kMaxLayers];
  void* v[kMaxLayers];
  int n, n_layers, first, n_kv_heads, head_dim, n_slots;
};

// Both return the launch's error (cudaSuccess when it was queued).
cudaError_t launch_kv_fill(const FillParams& p, DType dtype, bool vectorized, cudaStream_t stream);
cudaError_t launch_kv_copy(const CopyParams& p, int element_size, cudaStream_t stream);

}  // namespace cee_gen
