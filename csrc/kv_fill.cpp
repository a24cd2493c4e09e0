// Torch binding of the fused KV-cache copy-forward: argument checks, then the CUDA launch.
//
// The op schemas are declared once, in Python (cee_gen/ops/__init__.py), because the ops must exist
// without this library; loading it adds their CUDA kernels, which the dispatcher then prefers for
// CUDA tensors over the PyTorch twins (cee_gen/ops/reference.py).
#include <Python.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "kv_fill.h"

namespace cee_gen {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "cee_gen::kv_fill: dtype ", t.scalar_type(),
                  " is not supported: use float32, float16 or bfloat16");
  }
}

void check_on(const at::Tensor& t, const char* name, const at::Device& dev) {
  TORCH_CHECK(t.device() == dev, "cee_gen::kv_fill: ", name, " is on ", t.device(), ", expected ", dev);
  TORCH_CHECK(t.is_contiguous(), "cee_gen::kv_fill: ", name, " must be contiguous");
}

void check_entries(const at::Tensor& rows, const at::Tensor& slots,
                   const std::optional<at::Tensor>& exit_layer, const at::Device& dev) {
  std::vector<const at::Tensor*> index = {&rows, &slots};
  if (exit_layer.has_value()) index.push_back(&*exit_layer);
  for (const at::Tensor* t : index) {
    check_on(*t, "an entry index tensor (rows, slots, exit_layer)", dev);
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1 && t->numel() == rows.numel(),
                "cee_gen::kv_fill: rows, slots and exit_layer must be int64 vectors of one length");
  }
  TORCH_CHECK(rows.numel() <= 65535 * 8, "cee_gen::kv_fill: too many entries (", rows.numel(), ")");
}

// Checks the caches (same shape, dtype, device, contiguous) and copies their pointers.
void cache_pointers(at::TensorList k_cache, at::TensorList v_cache, const at::Tensor& like,
                    void** k, void** v) {
  const int64_t L = static_cast<int64_t>(k_cache.size());
  TORCH_CHECK(L >= 1 && L <= kMaxLayers, "cee_gen::kv_fill: ", L, " layers; the kernel takes 1..",
              kMaxLayers);
  TORCH_CHECK(static_cast<int64_t>(v_cache.size()) == L, "cee_gen::kv_fill: ", L, " K caches but ",
              v_cache.size(), " V caches");
  for (int64_t j = 0; j < L; ++j) {
    for (const at::Tensor* t : {&k_cache[j], &v_cache[j]}) {
      check_on(*t, "a cache tensor", like.device());
      TORCH_CHECK(t->dim() == 4 && t->sizes() == k_cache[0].sizes(),
                  "cee_gen::kv_fill: every cache tensor must be (B, H_kv, S, hd), all the same shape");
      TORCH_CHECK(t->scalar_type() == like.scalar_type(), "cee_gen::kv_fill: cache dtype ",
                  t->scalar_type(), " differs from ", like.scalar_type());
    }
    k[j] = k_cache[j].data_ptr();
    v[j] = v_cache[j].data_ptr();
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

void kv_fill_cuda(const at::Tensor& h, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                  const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& rows,
                  const at::Tensor& slots, const std::optional<at::Tensor>& exit_layer,
                  int64_t first_layer, at::TensorList k_cache, at::TensorList v_cache, double eps,
                  bool normalize) {
  const at::Device dev = h.device();
  TORCH_CHECK(dev.is_cuda(), "cee_gen::kv_fill: the CUDA kernel got tensors on ", dev);
  const DType dt = dtype_of(h);
  check_on(h, "h", dev);
  check_on(w, "w", dev);
  check_on(cos, "cos", dev);
  check_on(sin, "sin", dev);
  check_entries(rows, slots, exit_layer, dev);
  TORCH_CHECK(h.dim() == 2, "cee_gen::kv_fill: h must be (N, D)");
  const int64_t N = h.size(0), D = h.size(1), L = static_cast<int64_t>(k_cache.size());
  TORCH_CHECK(rows.numel() == N, "cee_gen::kv_fill: h has ", N, " rows but there are ", rows.numel(),
              " entries");
  TORCH_CHECK(first_layer >= 0, "cee_gen::kv_fill: first_layer must be >= 0");

  FillParams p{};
  cache_pointers(k_cache, v_cache, h, p.k, p.v);
  const int64_t H = k_cache[0].size(1), S = k_cache[0].size(2), hd = k_cache[0].size(3);
  TORCH_CHECK(hd % 2 == 0, "cee_gen::kv_fill: head_dim must be even for RoPE, got ", hd);
  const int64_t kv = H * hd;
  TORCH_CHECK(w.dim() == 3 && w.size(0) == L && w.size(1) == 2 * kv && w.size(2) == D,
              "cee_gen::kv_fill: w must be (L, 2*H_kv*hd, D) = (", L, ", ", 2 * kv, ", ", D, "), got ",
              w.sizes());
  TORCH_CHECK(cos.sizes() == at::IntArrayRef({N, hd}) && sin.sizes() == cos.sizes(),
              "cee_gen::kv_fill: cos and sin must be (N, hd)");
  for (const at::Tensor* t : {&w, &cos, &sin})
    TORCH_CHECK(t->scalar_type() == h.scalar_type(), "cee_gen::kv_fill: dtypes of h, w, cos, sin differ");
  if (bias.has_value()) {
    check_on(*bias, "bias", dev);
    TORCH_CHECK(bias->sizes() == at::IntArrayRef({L, 2 * kv}) && bias->scalar_type() == h.scalar_type(),
                "cee_gen::kv_fill: bias must be (L, 2*H_kv*hd) in h's dtype");
  }
  if (N == 0 || first_layer >= L) return;

  p.h = h.data_ptr();
  p.w = w.data_ptr();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.cos = cos.data_ptr();
  p.sin = sin.data_ptr();
  p.rows = rows.data_ptr<int64_t>();
  p.slots = slots.data_ptr<int64_t>();
  p.exit_layer = exit_layer.has_value() ? exit_layer->data_ptr<int64_t>() : nullptr;
  p.n = static_cast<int>(N);
  p.dim = static_cast<int>(D);
  p.n_layers = static_cast<int>(L);
  p.first = static_cast<int>(first_layer);
  p.n_kv_heads = static_cast<int>(H);
  p.head_dim = static_cast<int>(hd);
  p.n_slots = static_cast<int>(S);
  p.eps = static_cast<float>(eps);
  p.normalize = normalize;
  const bool vec = (D * h.element_size()) % 16 == 0 && aligned16(p.h) && aligned16(p.w);

  const c10::cuda::CUDAGuard guard(dev);
  const cudaError_t err = launch_kv_fill(p, dt, vec, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "cee_gen::kv_fill: launch failed: ", cudaGetErrorString(err));
}

void kv_copy_cuda(const at::Tensor& rows, const at::Tensor& slots,
                  const std::optional<at::Tensor>& exit_layer, int64_t first_layer,
                  at::TensorList k_cache, at::TensorList v_cache) {
  const at::Device dev = rows.device();
  TORCH_CHECK(dev.is_cuda(), "cee_gen::kv_copy: the CUDA kernel got tensors on ", dev);
  TORCH_CHECK(first_layer >= 1, "copy-kv needs at least one computed layer: first_layer must be >= 1");
  check_entries(rows, slots, exit_layer, dev);
  TORCH_CHECK(rows.numel() <= 65535, "cee_gen::kv_copy: too many entries (", rows.numel(), ")");
  CopyParams p{};
  TORCH_CHECK(!k_cache.empty(), "cee_gen::kv_copy: no cache layers");
  cache_pointers(k_cache, v_cache, k_cache[0], p.k, p.v);
  p.rows = rows.data_ptr<int64_t>();
  p.slots = slots.data_ptr<int64_t>();
  p.exit_layer = exit_layer.has_value() ? exit_layer->data_ptr<int64_t>() : nullptr;
  p.n = static_cast<int>(rows.numel());
  p.n_layers = static_cast<int>(k_cache.size());
  p.first = static_cast<int>(first_layer);
  p.n_kv_heads = static_cast<int>(k_cache[0].size(1));
  p.n_slots = static_cast<int>(k_cache[0].size(2));
  p.head_dim = static_cast<int>(k_cache[0].size(3));
  const c10::cuda::CUDAGuard guard(dev);
  const cudaError_t err = launch_kv_copy(p, static_cast<int>(k_cache[0].element_size()),
                                         c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "cee_gen::kv_copy: launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(cee_gen, CUDA, m) {
  m.impl("kv_fill", &kv_fill_cuda);
  m.impl("kv_copy", &kv_copy_cuda);
}

}  // namespace cee_gen

// Importable as cee_gen._C (the setup.py build); importing it runs the registration above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "cee-gen CUDA kernels", -1, nullptr,
                            nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&def);
}
