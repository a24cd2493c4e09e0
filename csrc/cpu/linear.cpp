// CPU kernels of cee_cpu::linear_f32 and cee_cpu::linear_q: argument checks, ISA dispatch, threads.
//
// The schemas are declared once, in Python (cee_gen/ops/cpu.py), with PyTorch twins as their default
// kernels; loading this library adds the CPU kernels (TORCH_LIBRARY_IMPL(cee_cpu, CPU, m)).
//
// ISA: the best of AVX-512 (F/BW/VL/DQ), AVX2+FMA+F16C and plain C++ that the CPU supports, capped by
// CEE_GEN_CPU_ISA=avx512|avx2|scalar at load time or by cee_cpu_set_isa() (ctypes) later.
// Threads: at::parallel_for over tiles of kRowAlign rows of W. With this torch (OpenMP backend) the pragma in
// ATen's header runs on torch's own libgomp, which the extension shares because it asks for the same
// soname (libgomp.so.1, already loaded by libtorch_cpu): one pool, the one MKL and ATen use.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string_view>
#include <vector>

#include "linear.h"

namespace cee_cpu {
namespace {

Isa best_isa() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

int isa_from_env() {
  const int best = static_cast<int>(best_isa());
  const char* s = std::getenv("CEE_GEN_CPU_ISA");
  if (s == nullptr) return best;
  const std::string_view v(s);
  const int cap = v == "avx512" ? 2 : v == "avx2" ? 1 : v == "scalar" ? 0 : best;  // cpu.py warns on others
  return std::min(cap, best);
}

std::atomic<int> g_isa{isa_from_env()};

}  // namespace

Isa current_isa() { return static_cast<Isa>(g_isa.load(std::memory_order_relaxed)); }

Kernel kernel_for(Fmt fmt) {
#if defined(__x86_64__) || defined(__i386__)
  switch (static_cast<Isa>(g_isa.load(std::memory_order_relaxed))) {
    case Isa::kAvx512: return avx512_kernel(fmt);
    case Isa::kAvx2: return avx2_kernel(fmt);
    case Isa::kScalar: break;
  }
#endif
  return scalar_kernel(fmt);
}

namespace {

// Below this many weight-row x activation-row products (N*K*M) a call stays on one thread: waking the
// second costs a few microseconds, as much as ~50K multiply-adds.
constexpr int64_t kMinParallelWork = 1 << 16;

void run(const Problem& p, Fmt fmt) {
  const Kernel kernel = kernel_for(fmt);
  const int64_t tiles = (p.N + kRowAlign - 1) / kRowAlign;
  const int64_t work = p.N * p.K * std::min<int64_t>(p.M, 16);
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), std::min(tiles, work / kMinParallelWork));
  if (threads <= 1 || at::in_parallel_region()) {
    kernel(p, 0, p.N);
    return;
  }
  // One contiguous run of weight rows a thread: two threads streaming one long run each read ~20 %
  // faster than when they take turns over small chunks (measured, bench_lowbit.py's model); the
  // counter still hands a late thread's share to one that is free.
  const int64_t chunk = (tiles + threads - 1) / threads;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t t0; (t0 = next.fetch_add(chunk, std::memory_order_relaxed)) < tiles;)
      kernel(p, t0 * kRowAlign, std::min((t0 + chunk) * kRowAlign, p.N));
  });
}

const char* fmt_name(Fmt fmt) {
  switch (fmt) {
    case Fmt::kF32: return "f32";
    case Fmt::kQ8_0: return "q8_0";
    case Fmt::kQ4_0: return "q4_0";
    case Fmt::kQ4_1: return "q4_1";
  }
  return "?";
}

// One call's tensors (owned here, so copies made for unit stride live as long as the kernel runs) and
// the raw view of them the kernels take.
struct Call {
  at::Tensor x2, y, bias;
  std::vector<int64_t> out_shape;
  Problem p{};
};

// x (..., K) -> a 2-D (M, K) view with unit stride along K (a copy only when needed); y (M, N).
void prepare(Call& c, const at::Tensor& x, const std::optional<at::Tensor>& bias, int64_t N, int64_t K,
             Fmt fmt) {
  const char* op = fmt == Fmt::kF32 ? "cee_cpu::linear_f32" : "cee_cpu::linear_q";
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, op, ": x must be a float32 CPU tensor, got ",
              x.scalar_type(), " on ", x.device());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, op, ": x has ", x.dim() ? x.size(-1) : 0,
              " features but the ", fmt_name(fmt), " weight has K=", K);
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                    bias->size(0) == N,
                op, ": bias must be a float32 CPU vector of ", N, " values");
    c.bias = bias->contiguous();
    c.p.bias = c.bias.data_ptr<float>();
  }
  if (x.dim() == 2 && x.stride(1) == 1) {  // the common case, without making views
    c.x2 = x;
  } else {
    c.out_shape.assign(x.sizes().begin(), x.sizes().end() - 1);
    int64_t M = 1;
    for (const int64_t s : c.out_shape) M *= s;
    c.x2 = x.reshape({M, K});
    if (c.x2.stride(1) != 1) c.x2 = c.x2.contiguous();
    c.out_shape.push_back(N);
  }
  c.y = at::empty({c.x2.size(0), N}, x.options());
  c.p.x = c.x2.data_ptr<float>();
  c.p.ldx = c.x2.stride(0);
  c.p.y = c.y.data_ptr<float>();
  c.p.ldy = N;
  c.p.M = c.x2.size(0);
  c.p.N = N;
  c.p.K = K;
}

at::Tensor finish(Call& c, Fmt fmt) {
  if (c.p.M > 0 && c.p.N > 0) {
    if (c.p.K == 0) {
      if (c.bias.defined()) c.y.copy_(c.bias.expand_as(c.y)); else c.y.zero_();
    } else {
      run(c.p, fmt);
    }
  }
  return c.out_shape.empty() ? c.y : c.y.view(c.out_shape);
}

at::Tensor linear_f32_cpu(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.dim() == 2,
              "cee_cpu::linear_f32: w must be a float32 CPU (N, K) matrix, got ", w.scalar_type(), " ",
              w.sizes());
  const at::Tensor wc = w.contiguous();
  Call c;
  prepare(c, x, bias, w.size(0), w.size(1), Fmt::kF32);
  c.p.w = wc.data_ptr<float>();
  return finish(c, Fmt::kF32);
}

Fmt parse_fmt(c10::string_view s) {
  if (s == "q8_0") return Fmt::kQ8_0;
  if (s == "q4_0") return Fmt::kQ4_0;
  if (s == "q4_1") return Fmt::kQ4_1;
  TORCH_CHECK(false, "cee_cpu::linear_q: unsupported block type '", std::string(s.data(), s.size()),
              "': supported are q4_0, q4_1, q8_0");
}

// The quants, scales and mins of one (N, K) weight in a block format, checked, as a Problem's W fields.
void set_blocks(Problem& p, const at::Tensor& qs, const at::Tensor& d, const std::optional<at::Tensor>& m,
                Fmt fmt, const char* op) {
  const bool q8 = fmt == Fmt::kQ8_0;
  TORCH_CHECK(qs.device().is_cpu() && qs.dim() == 2 && qs.is_contiguous() &&
                  qs.scalar_type() == (q8 ? at::kChar : at::kByte),
              op, ": ", fmt_name(fmt), " quants must be a contiguous ", q8 ? "int8 (N, K)" : "uint8 (N, K/2)",
              " CPU tensor, got ", qs.scalar_type(), " ", qs.sizes());
  const int64_t N = qs.size(0), K = q8 ? qs.size(1) : 2 * qs.size(1);
  TORCH_CHECK(K % 32 == 0, op, ": K=", K, " is not a multiple of the block size 32");
  auto check_scales = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kHalf && t.is_contiguous() &&
                    t.sizes() == at::IntArrayRef({N, K / 32}),
                op, ": ", name, " must be a contiguous float16 (N, K/32) = (", N, ", ", K / 32,
                ") CPU tensor, got ", t.scalar_type(), " ", t.sizes());
  };
  check_scales(d, "d");
  if (fmt == Fmt::kQ4_1) {
    TORCH_CHECK(m.has_value(), op, ": q4_1 needs the mins m");
    check_scales(*m, "m");
  }
  p.N = N;
  p.K = K;
  p.qs = qs.data_ptr();
  p.d = reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>());
  p.m = fmt == Fmt::kQ4_1 ? reinterpret_cast<const uint16_t*>(m->data_ptr<at::Half>()) : nullptr;
}

at::Tensor linear_q_cpu(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d,
                        const std::optional<at::Tensor>& m, c10::string_view fmt_s,
                        const std::optional<at::Tensor>& bias) {
  const Fmt fmt = parse_fmt(fmt_s);
  Problem w{};
  set_blocks(w, qs, d, m, fmt, "cee_cpu::linear_q");
  Call c;
  prepare(c, x, bias, w.N, w.K, fmt);
  c.p.qs = w.qs, c.p.d = w.d, c.p.m = w.m;
  return finish(c, fmt);
}

// The (N, K) fp32 weights of blocks, each block exactly as the kernels dequantize it (linear.h), rows split
// over threads: long prefills multiply them with MKL a chunk of rows at a time (weights/lowbit.py).
at::Tensor dequant_cpu(const at::Tensor& qs, const at::Tensor& d, const std::optional<at::Tensor>& m,
                       c10::string_view fmt_s) {
  const Fmt fmt = parse_fmt(fmt_s);
  Problem w{};
  set_blocks(w, qs, d, m, fmt, "cee_cpu::dequant");
  at::Tensor out = at::empty({w.N, w.K}, d.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  at::parallel_for(0, w.N, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(w.K, 1)),
                   [&](int64_t n0, int64_t n1) { dequant_rows(fmt, w, n0, n1, o); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(cee_cpu, CPU, m) {
  m.impl("linear_f32", &linear_f32_cpu);
  m.impl("linear_q", &linear_q_cpu);
  m.impl("dequant", &dequant_cpu);
}

}  // namespace cee_cpu

// For ctypes (cee_gen/ops/cpu.py): which variant runs, and a cap for tests and comparisons.
extern "C" {
int cee_cpu_best_isa() { return static_cast<int>(cee_cpu::best_isa()); }
int cee_cpu_get_isa() { return cee_cpu::g_isa.load(); }
int cee_cpu_set_isa(int cap) {
  const int isa = std::clamp(cap, 0, cee_cpu_best_isa());
  cee_cpu::g_isa.store(isa);
  return isa;
}
// For the threading check: how many threads a parallel region over `tiles` tiles gets.
int cee_cpu_threads_used(long tiles) {
  std::atomic<int> used{0};
  at::parallel_for(0, tiles, 1, [&](int64_t, int64_t) { used.fetch_add(1); });
  return used.load();
}
}
