"""Small-M CPU matmuls over one token's worth of SmolLM2-135M weights: MKL, Inductor, our kernels.

    python benchmarks/bench_cpu_linear.py                  # M = 1, 2, 4, 8, 16; ~10 min on 2 cores
    python benchmarks/bench_cpu_linear.py --ms 1 8 --repeats 5 --no-compile

One "token" is the 121 matmuls of a decode step: 30 layers x {wqkv (960, 576), wo (576, 576),
w13 (3072, 576), w2 (576, 1536)} + the tied head (49152, 576), each called on x (M, K), random
weights (timing does not depend on values), weights in memory as the engine holds them. Variants:

    mkl          F.linear (MKL sgemm), fp32
    mulsum       torch.compile'd (x.unsqueeze(-2) * w).sum(-1), fp32
    mulsum_nm    torch.compile'd (w * x[:, None, :]).sum(-1) laid out (N, M), then .t()
    f32          cee_cpu::linear_f32
    q8_0 / q4_0 / q4_1   cee_cpu::linear_q, every matrix in that format
    gguf         q4_1 decoder + q8_0 head: the default model's GGUF as it is stored

each at the best ISA and, for ours, also capped to AVX2 (`@avx2`). GB/s = bytes of weights in the
variant's format / time: a kernel that reads W once per call sits near the read bandwidth, measured
here as the `roofline` (a 512 MB tensor's sum). The machine may be shared: variants alternate
within each repeat and the medians are reported, with the load average at start and end.
One JSON object per line to --out (replaced), and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cee_gen.bench.env import git_commit, machine_info, versions  # noqa: E402
from cee_gen.ops import cpu, lowbit  # noqa: E402

L, D, HIDDEN, VOCAB = 30, 576, 1536, 49152
LAYER_SHAPES = {"wqkv": (960, D), "wo": (D, D), "w13": (2 * HIDDEN, D), "w2": (D, HIDDEN)}
BYTES_PER_WEIGHT = {"f32": 4.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32}


def token_shapes() -> list[tuple[str, int, int]]:
    return [(name, n, k) for _ in range(L) for name, (n, k) in LAYER_SHAPES.items()] + [("head", VOCAB, D)]


def read_bandwidth(repeats: int) -> float:
    """GB/s of a plain sum over 512 MB: the memory roofline of these kernels on this machine."""
    t = torch.ones(128 * 1024 * 1024)
    t.sum()
    ts = []
    for _ in range(repeats):
        a = time.perf_counter()
        t.sum()
        ts.append(time.perf_counter() - a)
    return t.numel() * 4 / statistics.median(ts) / 1e9


def build_variants(weights: list[torch.Tensor], compile_: bool, isas: list[str]):
    """name -> (fn(xs) running one token, bytes of weights it reads, isa or None)."""
    fmts = {f: [lowbit.quantize(w, f) for w in weights] for f in ("q8_0", "q4_0", "q4_1")}
    gguf = fmts["q4_1"][:-1] + [fmts["q8_0"][-1]]
    n_weights = sum(w.numel() for w in weights)

    def q_bytes(qws):
        return sum(q.nbytes for q in qws)

    def run(fn, ws):
        def token(xs):
            for w, x in zip(ws, xs):
                fn(x, w)
        return token

    variants = {"mkl": (run(F.linear, weights), n_weights * 4, None)}
    if compile_:
        def mulsum(x, w):
            return (x.unsqueeze(-2) * w).sum(-1)  # (M, N)

        def mulsum_nm(x, w):
            return (w * x[:, None, :]).sum(-1).t()  # (N, M) then (M, N)

        variants["mulsum"] = (run(torch.compile(mulsum, dynamic=False), weights), n_weights * 4, None)
        variants["mulsum_nm"] = (run(torch.compile(mulsum_nm, dynamic=False), weights), n_weights * 4, None)
    for isa in isas:
        tag = "" if isa == isas[0] else f"@{isa}"
        variants["f32" + tag] = (run(cpu.linear_f32, weights), n_weights * 4, isa)
        for f, qws in fmts.items():
            variants[f + tag] = (run(cpu.linear_q, qws), q_bytes(qws), isa)
        variants["gguf" + tag] = (run(cpu.linear_q, gguf), q_bytes(gguf), isa)
    return variants


@torch.inference_mode()
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--repeats", type=int, default=9, help="timed tokens per variant and M (medians)")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip the Inductor variants")
    ap.add_argument("--no-avx2", dest="avx2", action="store_false", help="skip our kernels capped to AVX2")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu_linear.jsonl")
    args = ap.parse_args(argv)

    if not cpu.load():
        sys.exit(f"the CPU kernels did not build: {cpu.why_not()}")
    best = cpu.best_isa()
    isas = [best] + (["avx2"] if args.avx2 and best == "avx512" else [])
    torch._dynamo.config.cache_size_limit = 64  # one graph per (shape, M)
    torch.manual_seed(0)
    shapes = token_shapes()
    distinct = {(n, k): torch.randn(n, k) * k ** -0.5 for _, n, k in shapes}
    # Distinct tensors per layer (as in the model), so nothing is served from cache across layers.
    weights = [distinct[(n, k)].clone() if name != "head" else distinct[(n, k)] for name, n, k in shapes]
    del distinct
    load0 = os.getloadavg()[0]
    roofline = read_bandwidth(5)
    variants = build_variants(weights, args.compile, isas)
    common = {"machine": machine_info(), "versions": versions(), "commit": git_commit(),
              "kernel_isa": best, "torch_threads": torch.get_num_threads(),
              "shapes": "SmolLM2-135M: 30 x {wqkv, wo, w13, w2} + head (49152, 576)",
              "repeats": args.repeats, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    times: dict[tuple[str, int], list[float]] = {}
    inputs = {M: [torch.randn(M, k) for _, _, k in shapes] for M in args.ms}
    for M in args.ms:  # warm-up: builds the compiled graphs, touches every page
        for name, (fn, _, isa) in variants.items():
            if isa:
                cpu.set_isa(isa)
            fn(inputs[M])
            print(f"warm M={M} {name}", file=sys.stderr, flush=True)
    for r in range(args.repeats):  # every variant once per repeat, interleaved
        for M in args.ms:
            for name, (fn, _, isa) in variants.items():
                if isa:
                    cpu.set_isa(isa)
                t = time.perf_counter()
                fn(inputs[M])
                times.setdefault((name, M), []).append(time.perf_counter() - t)
        print(f"repeat {r + 1}/{args.repeats}", file=sys.stderr, flush=True)
    cpu.set_isa(best)
    load1 = os.getloadavg()[0]

    recs = []
    for (name, M), ts in times.items():
        _, nbytes, isa = variants[name]
        med = statistics.median(ts)
        m1 = statistics.median(times[(name, 1)]) if (name, 1) in times else None
        recs.append({**common, "variant": name, "isa": isa or "torch", "M": M, "ms": round(med * 1e3, 3),
                     "ms_min": round(min(ts) * 1e3, 3), "weight_MB": round(nbytes / 1e6, 1),
                     "GBps": round(nbytes / med / 1e9, 2), "roofline_GBps": round(roofline, 1),
                     "roofline_ms": round(nbytes / roofline / 1e6, 3),
                     "vs_M1": round(med / m1, 3) if m1 else None,
                     "vs_mkl": round(med / statistics.median(times[("mkl", M)]), 3),
                     "loadavg_start_end": [round(load0, 2), round(load1, 2)]})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as f:
        for rec in recs:
            f.write(json.dumps(rec) + "\n")

    print(f"# ms per token-equivalent (121 matmuls), median of {args.repeats}; GB/s of weights read; "
          f"read roofline {roofline:.1f} GB/s; {torch.get_num_threads()} threads; load avg "
          f"{load0:.2f} -> {load1:.2f}")
    head = "| variant | MB | " + " | ".join(f"M={M}" for M in args.ms) + " | M=8 / M=1 |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    by = {(r["variant"], r["M"]): r for r in recs}
    for name, (_, nbytes, _) in variants.items():
        cells = [f"{by[(name, M)]['ms']:.1f} ({by[(name, M)]['GBps']:.0f})" for M in args.ms]
        ratio = (f"{by[(name, 8)]['ms'] / by[(name, 1)]['ms']:.2f}" if (name, 8) in by and (name, 1) in by
                 else "")
        print(f"| {name} | {nbytes / 1e6:.0f} | " + " | ".join(cells) + f" | {ratio} |")
    print(f"wrote {len(recs)} records to {args.out}")


if __name__ == "__main__":
    main()
