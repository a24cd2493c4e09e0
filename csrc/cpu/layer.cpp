// CPU kernel of cee_cpu::layer: one LLaMA-family decoder layer for a few query rows (decode steps, verify
// passes, small batches) in one call. Its twin is the model's own Block.forward (cee_gen/model.py), which
// tests/test_cpu_layer.py compares it with on random layers.
//
//   x = rmsnorm(h); q, k, v = x Wqkv^T; RoPE(q, k); cache[rows, :, slots] = k, v; a = attention(q, cache)
//   h1 = h + a Wo^T; x2 = rmsnorm(h1); g, u = x2 W13^T; out = h1 + (silu(g) * u) W2^T
//
// plus the deferred KV fill's columns (FillColumns): their K/V, normed and projected by this layer's
// weights and rotated, are written into the cache before any query attends.
//
// Why one op: a decode step of a small model is ~30 layers x ~12 small operations. Run one by one, each
// pays a dispatch and (for the matmuls) a fork and join of the thread pool; together that cost more than
// the arithmetic (docs/lowbit.md). Here a layer is one parallel region: every thread takes chunks of
// each matmul's weight rows (csrc/cpu/linear.h's kernels, so the products are bit for bit the ones the
// model's linear() computes), the per-row work is split by rows or heads, and the phases are separated
// by barriers. A row's result never depends on the other rows in the call.
#include <ATen/Parallel.h>
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "layer.h"
#include "linear.h"

namespace cee_cpu {
namespace {

constexpr const char* kOp = "cee_cpu::layer";
using OptTensors = c10::List<std::optional<at::Tensor>>;  // the schema's Tensor?[]

// One projection's weights as the linear kernels take them; x, y and M are set per product.
struct Proj {
  Fmt fmt = Fmt::kF32;
  Problem p{};
  Kernel kernel = nullptr;

  // Rows [r0, r0 + n) of W (and of the bias): a product that needs only some outputs (the fill's K/V).
  Proj rows(int64_t r0, int64_t n) const {
    Proj q = *this;
    q.p.N = n;
    if (fmt == Fmt::kF32) {
      q.p.w = p.w + r0 * p.K;
    } else {
      const int64_t row_bytes = fmt == Fmt::kQ8_0 ? p.K : p.K / 2;
      q.p.qs = static_cast<const uint8_t*>(p.qs) + r0 * row_bytes;
      q.p.d = p.d + r0 * (p.K / 32);
      if (p.m != nullptr) q.p.m = p.m + r0 * (p.K / 32);
    }
    if (p.bias != nullptr) q.p.bias = p.bias + r0;
    return q;
  }
};

Fmt parse_fmt(std::string_view s) {
  if (s == "f32") return Fmt::kF32;
  if (s == "q8_0") return Fmt::kQ8_0;
  if (s == "q4_0") return Fmt::kQ4_0;
  if (s == "q4_1") return Fmt::kQ4_1;
  TORCH_CHECK(false, kOp, ": unknown weight format '", std::string(s), "': use f32, q8_0, q4_0 or q4_1");
}

std::vector<Fmt> parse_fmts(std::string_view s) {
  std::vector<Fmt> out;
  while (true) {
    const size_t comma = s.find(',');
    out.push_back(parse_fmt(s.substr(0, comma)));
    if (comma == std::string_view::npos) break;
    s.remove_prefix(comma + 1);
  }
  TORCH_CHECK(out.size() == 4, kOp, ": fmts names the 4 projections (wqkv, wo, w13, w2), got ", out.size());
  return out;
}

const at::Tensor& need(const OptTensors& w, int64_t i, const char* what) {
  const std::optional<at::Tensor>& t = w.get(i);
  TORCH_CHECK(t.has_value() && t->defined(), kOp, ": ", what, " (w[", i, "]) is missing");
  return *t;  // the list holds the tensor for the whole call
}

// w[base..base+3] = weight (or quants), d, m, bias: one projection, (N, K) with K given.
Proj make_proj(const OptTensors& w, int64_t base, Fmt fmt, int64_t K, const char* name) {
  Proj pr;
  pr.fmt = fmt;
  pr.kernel = kernel_for(fmt);
  const at::Tensor& a = need(w, base, name);
  TORCH_CHECK(a.device().is_cpu() && a.dim() == 2 && a.is_contiguous(), kOp, ": ", name,
              " must be a contiguous 2-D CPU tensor, got ", a.sizes());
  const int64_t N = a.size(0);
  pr.p.N = N;
  pr.p.K = K;
  if (fmt == Fmt::kF32) {
    TORCH_CHECK(a.scalar_type() == at::kFloat && a.size(1) == K, kOp, ": ", name, " must be float32 (N, ", K,
                "), got ", a.scalar_type(), " ", a.sizes());
    pr.p.w = a.data_ptr<float>();
  } else {
    const bool q8 = fmt == Fmt::kQ8_0;
    TORCH_CHECK(K % 32 == 0 && a.scalar_type() == (q8 ? at::kChar : at::kByte) && a.size(1) == (q8 ? K : K / 2),
                kOp, ": ", name, " quants must be ", q8 ? "int8 (N, K)" : "uint8 (N, K/2)", " for K=", K, ", got ",
                a.scalar_type(), " ", a.sizes());
    pr.p.qs = a.data_ptr();
    auto scales = [&](int64_t i, const char* what) {
      const at::Tensor& t = need(w, base + i, what);
      TORCH_CHECK(t.scalar_type() == at::kHalf && t.is_contiguous() && t.sizes() == at::IntArrayRef({N, K / 32}),
                  kOp, ": ", name, " ", what, " must be contiguous float16 (", N, ", ", K / 32, "), got ",
                  t.scalar_type(), " ", t.sizes());
      return reinterpret_cast<const uint16_t*>(t.data_ptr<at::Half>());
    };
    pr.p.d = scales(1, "scales d");
    if (fmt == Fmt::kQ4_1) pr.p.m = scales(2, "mins m");
  }
  const std::optional<at::Tensor>& bias = w.get(base + 3);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->dim() == 1 &&
                    bias->size(0) == N,
                kOp, ": ", name, " bias must be a contiguous float32 vector of ", N);
    pr.p.bias = bias->data_ptr<float>();
  }
  return pr;
}

const float* vec(const OptTensors& w, int64_t i, int64_t D, const char* name) {
  const at::Tensor& t = need(w, i, name);
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == D, kOp,
              ": ", name, " must be a contiguous float32 vector of ", D);
  return t.data_ptr<float>();
}

at::Tensor f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, kOp, ": ", name, " must be float32 on the CPU, got ",
              t.scalar_type(), " on ", t.device());
  return t.contiguous();
}

at::Tensor i64(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong, kOp, ": ", name, " must be int64 on the CPU");
  return t.contiguous();
}

// A low-rank term beside a projection's blocks (a heads file's LoRA delta, weights/lowbit.py): rows
// [r0, r0 + n) of y += (x A^T) sB^T, A (r, K), sB (n, r).
struct LowRank {
  int64_t proj, r0, n, r;
  const float* A;
  const float* sB;
};
constexpr int64_t kMaxRank = 256;

std::vector<LowRank> parse_lowrank(at::TensorList lr, at::IntArrayRef meta, const Proj* const (&projs)[4]) {
  TORCH_CHECK(lr.size() % 2 == 0 && meta.size() == lr.size(), kOp, ": lr holds (A, sB) pairs and lr_meta a "
              "(projection, first row) pair for each");
  std::vector<LowRank> out;
  for (size_t i = 0; i < lr.size(); i += 2) {
    const at::Tensor &A = lr[i], &sB = lr[i + 1];
    const int64_t j = meta[i], r0 = meta[i + 1];
    TORCH_CHECK(j >= 0 && j < 4, kOp, ": low-rank term of projection ", j, " (0..3)");
    const Problem& p = projs[j]->p;
    TORCH_CHECK(A.scalar_type() == at::kFloat && sB.scalar_type() == at::kFloat && A.is_contiguous() &&
                    sB.is_contiguous() && A.dim() == 2 && sB.dim() == 2 && A.size(1) == p.K &&
                    sB.size(1) == A.size(0) && A.size(0) <= kMaxRank && r0 >= 0 && r0 + sB.size(0) <= p.N,
                kOp, ": low-rank term ", i / 2, " must be contiguous float32 A (r <= ", kMaxRank, ", ", p.K,
                ") and sB (n, r) with rows [r0, r0 + n) inside the projection's ", p.N);
    out.push_back({j, r0, sB.size(0), A.size(0), A.data_ptr<float>(), sB.data_ptr<float>()});
  }
  return out;
}

// y[m, c - c0] += the terms of projection j over output columns c in [c0, c1), for row m of x (ldx K)
void add_lowrank(const std::vector<LowRank>& terms, int64_t j, const float* x, float* y, int64_t K,
                 int64_t c0, int64_t c1) {
  for (const LowRank& t : terms) {
    const int64_t lo = std::max(t.r0, c0), hi = std::min(t.r0 + t.n, c1);
    if (t.proj != j || lo >= hi) continue;
    float u[kMaxRank];
    for (int64_t a = 0; a < t.r; ++a) {
      const float* Ar = t.A + a * K;
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k) acc += x[k] * Ar[k];
      u[a] = acc;
    }
    for (int64_t c = lo; c < hi; ++c) {
      const float* Br = t.sB + (c - t.r0) * t.r;
      float acc = 0.0f;
      for (int64_t a = 0; a < t.r; ++a) acc += u[a] * Br[a];
      y[c - c0] += acc;
    }
  }
}

// Below this much weight-row x activation-row work a call stays on one thread (as linear.cpp's run()).
constexpr int64_t kMinParallelWork = 1 << 16;

// out (B, T, D)
at::Tensor layer_cpu(const at::Tensor& h_in, const OptTensors& w, c10::string_view fmts_s, const at::Tensor& k_cache,
                     const at::Tensor& v_cache, const at::Tensor& cos_in, const at::Tensor& sin_in,
                     const at::Tensor& slots_in, const std::optional<at::Tensor>& rows_in, const at::Tensor& mask,
                     int64_t H, int64_t Hkv, double eps_d, const std::optional<at::Tensor>& fill_h_in,
                     const std::optional<at::Tensor>& fill_slots_in, const std::optional<at::Tensor>& fill_cos_in,
                     const std::optional<at::Tensor>& fill_sin_in, at::TensorList lr, at::IntArrayRef lr_meta) {
  const at::Tensor h = f32(h_in, "h");
  TORCH_CHECK(h.dim() == 3, kOp, ": h must be (B, T, D), got ", h.sizes());
  const int64_t B = h.size(0), T = h.size(1), D = h.size(2), M = B * T;
  TORCH_CHECK(w.size() == 18, kOp, ": w holds the 2 norms and 4 projections x (weight, d, m, bias): 18 entries, got ",
              w.size());
  for (const at::Tensor* c : {&k_cache, &v_cache})
    TORCH_CHECK(c->device().is_cpu() && c->scalar_type() == at::kFloat && c->dim() == 4 && c->is_contiguous() &&
                    c->size(1) == Hkv && c->sizes() == k_cache.sizes(),
                kOp, ": the caches must be contiguous float32 (B, H_kv=", Hkv, ", S, hd), got ", c->sizes());
  const int64_t Bc = k_cache.size(0), S = k_cache.size(2), hd = k_cache.size(3);
  TORCH_CHECK(H > 0 && Hkv > 0 && H % Hkv == 0 && hd % 2 == 0, kOp, ": ", H, " query heads over ", Hkv,
              " KV heads of size ", hd, " (heads must group evenly, hd be even)");
  const int64_t qsz = H * hd, kvsz = Hkv * hd, Nqkv = qsz + 2 * kvsz;

  const std::vector<Fmt> fmt = parse_fmts(std::string_view(fmts_s.data(), fmts_s.size()));
  const float* w_attn_norm = vec(w, 0, D, "attention_norm weight");
  const float* w_ffn_norm = vec(w, 1, D, "ffn_norm weight");
  const Proj qkv = make_proj(w, 2, fmt[0], D, "wqkv");
  const Proj wo = make_proj(w, 6, fmt[1], qsz, "wo");
  const Proj w13 = make_proj(w, 10, fmt[2], D, "w13");
  TORCH_CHECK(qkv.p.N == Nqkv && wo.p.N == D && w13.p.N % 2 == 0, kOp, ": projection shapes do not fit D=", D,
              ", heads ", H, "/", Hkv, " x ", hd);
  const int64_t I = w13.p.N / 2;
  const Proj w2 = make_proj(w, 14, fmt[3], I, "w2");
  TORCH_CHECK(w2.p.N == D, kOp, ": w2 must have D=", D, " rows");
  const Proj* projs[4] = {&qkv, &wo, &w13, &w2};
  const std::vector<LowRank> terms = parse_lowrank(lr, lr_meta, projs);

  // where the queries sit: slots (T,) or (B, T), cache rows (B,), RoPE rows (1 or B, T, 1, hd), mask
  const at::Tensor slots = i64(slots_in, "slots");
  TORCH_CHECK((slots.dim() == 1 && slots.size(0) == T) || (slots.dim() == 2 && slots.size(0) == B && slots.size(1) == T),
              kOp, ": slots must be (T,) or (B, T), got ", slots.sizes());
  const bool per_row_slots = slots.dim() == 2;
  const int64_t* slot = slots.data_ptr<int64_t>();
  at::Tensor rows;
  if (rows_in.has_value()) {
    rows = i64(*rows_in, "rows");
    TORCH_CHECK(rows.dim() == 1 && rows.size(0) == B, kOp, ": rows must be (B,)");
  } else {
    TORCH_CHECK(B <= Bc, kOp, ": ", B, " rows for a cache of ", Bc);
  }
  const int64_t* row = rows.defined() ? rows.data_ptr<int64_t>() : nullptr;
  const at::Tensor cos = f32(cos_in, "cos"), sin = f32(sin_in, "sin");
  TORCH_CHECK(cos.numel() % (T * hd) == 0 && cos.sizes() == sin.sizes() && cos.size(-1) == hd, kOp,
              ": cos/sin must be (1 or B, T, 1, hd), got ", cos.sizes());
  const int64_t Bcos = cos.numel() / (T * hd);
  TORCH_CHECK(Bcos == 1 || Bcos == B, kOp, ": cos/sin must be (1 or B, T, 1, hd), got ", cos.sizes());
  TORCH_CHECK(mask.device().is_cpu() && mask.scalar_type() == at::kBool && mask.dim() == 4 && mask.size(2) == T &&
                  (mask.size(0) == 1 || mask.size(0) == B) && mask.size(-1) >= 1 && mask.size(-1) <= S,
              kOp, ": mask must be bool (1 or B, 1, T, S') with 1 <= S' <= ", S, ", got ", mask.sizes());
  const int64_t Sk = mask.size(-1);  // slots the queries may read
  const int64_t msb = mask.size(0) == 1 ? 0 : mask.stride(0), mst = mask.stride(2), mss = mask.stride(3);
  const bool* mk = mask.data_ptr<bool>();
  for (int64_t b = 0; b < B; ++b) {  // host-side bounds: nothing below may write outside the cache
    TORCH_CHECK(row == nullptr || (row[b] >= 0 && row[b] < Bc), kOp, ": cache row ", row ? row[b] : b, " of ", Bc);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t s = slot[per_row_slots ? b * T + t : t];
      TORCH_CHECK(s >= 0 && s < S, kOp, ": slot ", s, " outside the cache's ", S);
    }
  }

  // the fill columns: (B, P, D) states, (B, P) slots, (B, P, 1, hd) RoPE rows
  int64_t P = 0;
  at::Tensor fh, fslots, fcos, fsin;
  if (fill_h_in.has_value()) {
    TORCH_CHECK(fill_slots_in && fill_cos_in && fill_sin_in, kOp, ": fill_h needs fill_slots, fill_cos, fill_sin");
    fh = f32(*fill_h_in, "fill_h");
    P = fh.size(1);
    fslots = i64(*fill_slots_in, "fill_slots");
    fcos = f32(*fill_cos_in, "fill_cos");
    fsin = f32(*fill_sin_in, "fill_sin");
    TORCH_CHECK(fh.dim() == 3 && fh.size(0) == B && fh.size(2) == D && fslots.sizes() == at::IntArrayRef({B, P}) &&
                    fcos.numel() == B * P * hd && fsin.numel() == B * P * hd,
                kOp, ": fill columns must be h (B, P, D), slots (B, P), cos/sin (B, P, 1, hd)");
    const int64_t* fs = fslots.data_ptr<int64_t>();
    for (int64_t i = 0; i < B * P; ++i) TORCH_CHECK(fs[i] >= 0 && fs[i] < S, kOp, ": fill slot ", fs[i], " outside ", S);
  }
  const int64_t F = B * P;

  at::Tensor out = at::empty({B, T, D}, h.options());
  if (M == 0) return out;

  const int64_t work = (Nqkv * D + D * qsz + 2 * I * D + D * I) * std::min<int64_t>(M + F, 16);
  int64_t nt = at::in_parallel_region() ? 1 : std::max<int64_t>(1, at::get_num_threads());
  if (work < kMinParallelWork) nt = 1;
  // attention work items: the query heads of one KV head read its K/V once, together; a group is split
  // in two where that leaves too few items to keep every thread busy
  int64_t per_item = std::min(H / Hkv, kMaxGroup);
  while (per_item % 2 == 0 && M * (H / per_item) < 2 * nt) per_item /= 2;
  while ((H / Hkv) % per_item != 0) --per_item;
  const int64_t n_groups = H / per_item;

  // scratch: one allocation, carved up
  const int64_t n_scratch = M * D * 5 + M * Nqkv + F * D + F * 2 * kvsz + M * qsz + M * 2 * I + M * I + nt * per_item * Sk;
  at::Tensor scratch = at::empty({n_scratch}, h.options());
  float* sp = scratch.data_ptr<float>();
  auto take = [&](int64_t n) { float* p = sp; sp += n; return p; };
  float* xn = take(M * D);
  float* qkv_y = take(M * Nqkv);
  float* fxn = take(F * D);
  float* fkv = take(F * 2 * kvsz);
  float* att = take(M * qsz);
  float* o_y = take(M * D);
  float* h1 = take(M * D);
  float* xn2 = take(M * D);
  float* gu = take(M * 2 * I);
  float* act = take(M * I);
  float* d_y = take(M * D);
  float* scores = take(nt * per_item * Sk);

  const Math math = layer_math(current_isa());
  const float eps = static_cast<float>(eps_d), scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const float* hp = h.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* snp = sin.data_ptr<float>();
  const float* fhp = F ? fh.data_ptr<float>() : nullptr;
  const int64_t* fsp = F ? fslots.data_ptr<int64_t>() : nullptr;
  const float* fcp = F ? fcos.data_ptr<float>() : nullptr;
  const float* fsnp = F ? fsin.data_ptr<float>() : nullptr;
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const Proj fill_kv = qkv.rows(qsz, 2 * kvsz);
  bool has_lr[4] = {false, false, false, false};
  for (const LowRank& t : terms) has_lr[t.proj] = true;

  // y (rows, N) = x (rows, K) @ W^T: each thread takes a chunk of weight rows from a shared counter
  std::atomic<int64_t> next[5];
  for (auto& n : next) n.store(0);
  auto product = [&](const Proj& pr, const float* x, int64_t ldx, int64_t rows_x, float* y, int64_t ldy,
                     std::atomic<int64_t>& ctr) {
    if (rows_x == 0) return;
    Problem p = pr.p;
    p.x = x, p.ldx = ldx, p.y = y, p.ldy = ldy, p.M = rows_x;
    const int64_t tiles = (p.N + kRowAlign - 1) / kRowAlign;
    const int64_t chunk = (tiles + nt - 1) / nt;  // one contiguous run of rows a thread (see linear.cpp)
    for (int64_t t0; (t0 = ctr.fetch_add(chunk, std::memory_order_relaxed)) < tiles;)
      pr.kernel(p, t0 * kRowAlign, std::min((t0 + chunk) * kRowAlign, p.N));
  };
  auto kv_at = [&](float* cache, int64_t r, int64_t g, int64_t s) { return cache + ((r * Hkv + g) * S + s) * hd; };

#pragma omp parallel num_threads(static_cast<int>(nt)) if (nt > 1)
  {
    const int64_t tid = omp_get_thread_num(), n = omp_get_num_threads();
    for (int64_t r = tid; r < M + F; r += n) {  // 1. attention norms
      if (r < M) math.rmsnorm(hp + r * D, w_attn_norm, xn + r * D, D, eps);
      else math.rmsnorm(fhp + (r - M) * D, w_attn_norm, fxn + (r - M) * D, D, eps);
    }
#pragma omp barrier
    product(qkv, xn, D, M, qkv_y, Nqkv, next[0]);  // 2. q, k, v; the fill columns' k, v
    product(fill_kv, fxn, D, F, fkv, 2 * kvsz, next[1]);
    if (has_lr[0]) {
#pragma omp barrier
      for (int64_t r = tid; r < M + F; r += n) {
        if (r < M) add_lowrank(terms, 0, xn + r * D, qkv_y + r * Nqkv, D, 0, Nqkv);
        else add_lowrank(terms, 0, fxn + (r - M) * D, fkv + (r - M) * 2 * kvsz, D, qsz, Nqkv);
      }
    }
#pragma omp barrier
    for (int64_t b = tid; b < B; b += n) {  // 3. RoPE, cache writes: a row's in order, fill first
      const int64_t r = row ? row[b] : b;
      for (int64_t p = 0; p < P; ++p) {
        float* k = fkv + (b * P + p) * 2 * kvsz;
        const int64_t s = fsp[b * P + p];
        for (int64_t g = 0; g < Hkv; ++g) {
          math.rope(k + g * hd, fcp + (b * P + p) * hd, fsnp + (b * P + p) * hd, hd);
          std::copy_n(k + g * hd, hd, kv_at(kc, r, g, s));
          std::copy_n(k + kvsz + g * hd, hd, kv_at(vc, r, g, s));
        }
      }
      for (int64_t t = 0; t < T; ++t) {
        float* q = qkv_y + (b * T + t) * Nqkv;
        const int64_t c = ((Bcos == 1 ? 0 : b) * T + t) * hd;
        const int64_t s = slot[per_row_slots ? b * T + t : t];
        for (int64_t i = 0; i < H; ++i) math.rope(q + i * hd, cp + c, snp + c, hd);
        for (int64_t g = 0; g < Hkv; ++g) {
          math.rope(q + qsz + g * hd, cp + c, snp + c, hd);
          std::copy_n(q + qsz + g * hd, hd, kv_at(kc, r, g, s));
          std::copy_n(q + qsz + kvsz + g * hd, hd, kv_at(vc, r, g, s));
        }
      }
    }
#pragma omp barrier
    for (int64_t it = tid; it < M * n_groups; it += n) {  // 4. attention, one group of query heads at a time
      const int64_t m = it / n_groups, j = it % n_groups, b = m / T, t = m % T;
      const int64_t g = j * per_item / (H / Hkv), i0 = j * per_item;  // its KV head, first query head
      const int64_t r = row ? row[b] : b;
      math.attend(qkv_y + m * Nqkv + i0 * hd, kv_at(kc, r, g, 0), kv_at(vc, r, g, 0), mk + b * msb + t * mst, mss,
                  Sk, hd, per_item, scale, scores + tid * per_item * Sk, att + m * qsz + i0 * hd);
    }
#pragma omp barrier
    product(wo, att, qsz, M, o_y, D, next[2]);  // 5. output projection
#pragma omp barrier
    if (has_lr[1]) {
      for (int64_t r = tid; r < M; r += n) add_lowrank(terms, 1, att + r * qsz, o_y + r * D, qsz, 0, D);
#pragma omp barrier
    }
    for (int64_t r = tid; r < M; r += n) {  // 6. residual, FFN norm
      math.add(hp + r * D, o_y + r * D, h1 + r * D, D);
      math.rmsnorm(h1 + r * D, w_ffn_norm, xn2 + r * D, D, eps);
    }
#pragma omp barrier
    product(w13, xn2, D, M, gu, 2 * I, next[3]);  // 7. gate | up
#pragma omp barrier
    if (has_lr[2]) {
      for (int64_t r = tid; r < M; r += n) add_lowrank(terms, 2, xn2 + r * D, gu + r * 2 * I, D, 0, 2 * I);
#pragma omp barrier
    }
    for (int64_t r = tid; r < M; r += n) math.silu_mul(gu + r * 2 * I, gu + r * 2 * I + I, act + r * I, I);
#pragma omp barrier
    product(w2, act, I, M, d_y, D, next[4]);  // 8. down
#pragma omp barrier
    if (has_lr[3]) {
      for (int64_t r = tid; r < M; r += n) add_lowrank(terms, 3, act + r * I, d_y + r * D, I, 0, D);
#pragma omp barrier
    }
    for (int64_t r = tid; r < M; r += n) math.add(h1 + r * D, d_y + r * D, op + r * D, D);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(cee_cpu, CPU, m) { m.impl("layer", &layer_cpu); }

}  // namespace cee_cpu
