"""GPU suite: memory bandwidth, full-depth decode against the roofline, the fused KV fill against its
twin, and early exit measured against ideal speed-up.

    python benchmarks/bench_gpu.py --shape llama2-7b               # a CUDA device, bf16
    python benchmarks/bench_gpu.py --shape llama3-8b --new-tokens 128
    python benchmarks/bench_gpu.py --shape tiny --device cpu --out /tmp/smoke.jsonl   # anywhere

Random weights in real LLaMA shapes: the GPU machine cannot download weights, and nothing timed
here depends on their values. The early-exit rows replay per-token exit layers recorded from a real
run of the default model (`cee-bench`'s journal, benchmarks/results/bench_cpu.rows.jsonl, test
split, the settings in --replay), scaled to this model's depth; every record says so.

Records (one JSON object per line, appended to --out, with machine, versions and commit):
- `bandwidth`: device memory bandwidth, read (a large sum) and copy (read + write), median of repeats.
- `decode`: full-depth batch-1 greedy decode through the engine, eager and torch.compile'd (modes
  default and reduce-overhead, the CUDA-graph one): tok/s,
  weight GB/s (weight bytes per token x tok/s) and its fraction of the measured read bandwidth.
- `kv_fill`: one exited token's fill of layers [L/2, L) (and 4 tokens'), through the op (the CUDA
  kernel when built; else the twin, and the record says `kernel: false`) and through the twin:
  time, GB/s of the bytes it must move (skipped layers' K/V weights + cache writes), ratio.
- `early_exit`: the decode step at replayed per-token depths and at static k = L/2, against full
  depth in the same loop: measured speed-up beside the ideal L / mean layers; each with the eager
  KV fill (the kv_fill op at every exit) and the deferred one (`fill_timing`).
Every record names the attention kernel (`--attention`: flash-attn when installed, else SDPA); with
flash-attn, full-depth decode is timed with SDPA too, in the same run.
Timing: CUDA events around each measured region after a warm-up, medians over --repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import weight_bytes_per_token  # noqa: E402

from cee_gen.bench.env import git_commit, machine_info, versions  # noqa: E402
from cee_gen.cache import cache_slots  # noqa: E402
from cee_gen.exits.strategies import Strategy  # noqa: E402
from cee_gen.model import ModelArgs, Transformer, rope_tables  # noqa: E402
from cee_gen.ops import flash  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SHAPES = {
    "llama2-7b": ModelArgs(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128,
                           intermediate_size=11008, max_position_embeddings=4096),
    "llama3-8b": ModelArgs(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                           intermediate_size=14336, rope_theta=500000.0, max_position_embeddings=8192),
    "smollm2-135m": ModelArgs(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
                              intermediate_size=1536, rope_theta=1e5, max_position_embeddings=8192,
                              tie_word_embeddings=True),
    "tiny": ModelArgs(vocab_size=256, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16,
                      intermediate_size=128, max_position_embeddings=512),
}


class Clock:
    """Seconds of a region: CUDA events on a GPU (no host sync inside the region), perf_counter else."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def time(self, fn) -> float:
        if not self.cuda:
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / 1e3

    def median(self, fn, repeats: int) -> float:
        fn()  # warm-up
        return statistics.median(self.time(fn) for _ in range(repeats))


def random_model(a: ModelArgs, dtype: torch.dtype, device: torch.device) -> Transformer:
    """A Transformer in shape `a` with N(0, 0.02) weights, allocated on `device` directly (no CPU copy)."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            net = Transformer(a)
    finally:
        torch.set_default_dtype(prev)
    net = net.to_empty(device=device).eval()
    if a.tie_word_embeddings:  # to_empty made two parameters of the tied one
        net.output.weight = net.tok_embeddings.weight
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=g)
        cos, sin = rope_tables(a, a.max_position_embeddings)  # the buffers were meta: recompute
        net.rope_cos, net.rope_sin = cos.to(device), sin.to(device)
    return net


def bandwidth(device: torch.device, clock: Clock, repeats: int, n_bytes: int) -> dict:
    x = torch.ones(n_bytes // 4, device=device)
    y = torch.empty_like(x)
    read = clock.median(lambda: x.sum(), repeats)
    copy = clock.median(lambda: y.copy_(x), repeats)
    return {"kind": "bandwidth", "bytes": n_bytes, "read_gbs": round(n_bytes / read / 1e9, 1),
            "copy_gbs": round(2 * n_bytes / copy / 1e9, 1)}


def replayed_depths(settings: list[str], L: int, n: int, journal: Path) -> dict[str, list[int]]:
    """Per-token exit layers of the default model's test rows for each setting, scaled to depth L."""
    out = {}
    if not journal.exists():
        return out
    with journal.open() as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for s in settings:
        seq = [x for r in rows if r.get("setting") == s and r.get("split") == "test"
               for x in r["layers"][1:]]  # the first token comes from the full-depth prefill
        if seq:
            L0 = 30  # SmolLM2-135M's depth, the model the journal was recorded on
            out[s] = [max(1, min(L, round(e * L / L0))) for e in (seq * (n // len(seq) + 1))[:n]]
    return out


def decode_tokens_s(net, compile: bool, mode: str, prompt: int, new: int,
                    repeats: int) -> tuple[float, float]:
    """(tok/s of decode, compile seconds) for a full-depth greedy run through the engine."""
    from cee_gen.config import GenerationConfig
    from cee_gen.engine import Decoder, generate_batch

    dec = Decoder(net, compile=compile, mode=mode)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, net.args.vocab_size, (prompt,), generator=gen).tolist()
    cfg = GenerationConfig(max_new_tokens=new)
    times, comp = [], 0.0
    for r in range(repeats + 1):  # the first run warms up (and compiles)
        _, tm = generate_batch(dec, [ids], cfg, pad_id=0, eos_ids=[])
        comp += tm.compile_s
        if r:
            times.append(tm.decode_s)
    return (new - 1) / statistics.median(times), comp  # the first token comes from the prefill


def fill_records(net, clock: Clock, repeats: int, common: dict) -> list[dict]:
    from cee_gen import ops
    from cee_gen.cache import StaticKVCache
    from cee_gen.kv_fill import KVFiller
    from cee_gen.ops import native, reference

    a, dev = net.args, net.tok_embeddings.weight.device
    dt = net.tok_embeddings.weight.dtype
    _, folded, bias = KVFiller(net).stacks()
    e, L, kv = a.n_layers // 2, a.n_layers, a.n_kv_heads * a.head_dim
    cache = StaticKVCache(a, 4, 512, dt, dev)
    out = []
    for N in (1, 4):
        h = torch.randn(N, a.dim, device=dev, dtype=dt)
        rows, slots = torch.arange(N, device=dev), torch.full((N,), 300, device=dev)
        cos, sin = net.rope_cos[slots].to(dt), net.rope_sin[slots].to(dt)
        args = (h, folded[0], bias[0], cos, sin, rows, slots, None, e, cache.k, cache.v,
                a.norm_eps, True)  # exit_layer None: all entries exit at e, as the engine calls it
        t_op = clock.median(lambda args=args: ops.kv_fill(*args), repeats)
        t_twin = clock.median(lambda args=args: reference.kv_fill_ref(*args), repeats)
        el = h.element_size()
        moved = (L - e) * 2 * kv * a.dim * el + N * (L - e) * 2 * kv * el  # weights read + cache written
        out.append({**common, "kind": "kv_fill", "entries": N, "exit_layer": e, "skipped_layers": L - e,
                    "kernel": native.available() and dev.type == "cuda", "bytes": moved,
                    "op_us": round(t_op * 1e6, 1), "twin_us": round(t_twin * 1e6, 1),
                    "op_gbs": round(moved / t_op / 1e9, 1), "twin_gbs": round(moved / t_twin / 1e9, 1),
                    "twin_over_op": round(t_twin / t_op, 2)})
    return out


class Replay(Strategy):
    """A planned strategy that exits the t-th decode step at seq[t] (a recorded run's depths)."""
    name, planned = "replay", True

    def __init__(self, seq: list[int], n_layers: int):
        super().__init__(sorted({d for d in seq if d < n_layers}), n_layers)
        self.seq, self.t = seq, 0

    def plan(self, tok_ids):
        d, self.t = self.seq[self.t], self.t + 1
        return [d] * len(tok_ids)


def early_exit_records(net, depths: dict[str, list[int]], clock: Clock, repeats: int, prompt: int,
                       common: dict) -> list[dict]:
    """Decode steps at the given per-token depths vs full depth, same loop, eager engine steps.

    Each plan runs twice: with the eager fill (the plain step at that depth, then one kv_fill op:
    the CUDA kernel when built), and with the deferred fill (the exit step, whose next deeper
    tokens write the skipped K/V in their own layers' projections)."""
    from cee_gen.engine import BatchTimings, Decoder, ExitRun, ExitStep
    from cee_gen.exits.heads import ExitHeads
    from cee_gen.kv_fill import DeferredFill

    a, dev = net.args, net.tok_embeddings.weight.device
    L = a.n_layers
    dec = Decoder(net)
    n = len(next(iter(depths.values())))
    n_slots = cache_slots(prompt + n + 1)
    cache = dec.new_cache(1, n_slots)
    pad = torch.zeros(1, dtype=torch.long, device=dev)
    tok = torch.zeros(1, 1, dtype=torch.long, device=dev)  # slots before `prompt`: zeros; timing only
    heads = ExitHeads.logit_lens(net)

    def run(seq, timing):
        if timing == "eager":
            for t, d in enumerate(seq):
                dec.step(cache, tok, prompt + t, pad, depth=None if d >= L else d)
            return
        run_ = ExitRun(Replay(seq, L), heads, "propagate", deferred=True)
        tm = BatchTimings()
        step = ExitStep(dec, run_, DeferredFill(net, 1, n_slots, pad), tm)
        for t in range(len(seq)):
            step(cache, tok, [0], prompt + t, pad, [0])

    plans = {("full", "eager"): [L] * n}
    for k, seq in depths.items():
        plans[k, "eager"] = plans[k, "deferred"] = seq
    times = {k: [] for k in plans}
    for (_, timing), seq in plans.items():
        run(seq, timing)  # warm-up
    for _ in range(repeats):  # interleaved, so drift hits every plan alike
        for (k, timing), seq in plans.items():
            times[k, timing].append(clock.time(lambda seq=seq, timing=timing: run(seq, timing)))
    base = statistics.median(times["full", "eager"])
    out = []
    for (k, timing), seq in plans.items():
        med = statistics.median(times[k, timing])
        mean = sum(seq) / len(seq)
        out.append({**common, "kind": "early_exit", "plan": k, "tokens": n,
                    "fill_timing": None if k == "full" else timing,
                    "source": "static" if k.startswith("static") or k == "full" else
                    "replayed from the default model's test rows (bench_cpu.rows.jsonl)",
                    "mean_layers": round(mean, 2), "ideal_speedup": round(L / mean, 3),
                    "measured_speedup": round(base / med, 3),
                    "fraction_of_ideal": round((base / med) / (L / mean), 3),
                    "ms_per_token": round(1e3 * med / n, 3)})
    return out


@torch.inference_mode()
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compile", action="store_true",
                    help="also time the torch.compile'd full-depth decode, modes default and reduce-overhead")
    ap.add_argument("--replay", default="policy t=0.15,policy t=0.08,confidence t=0.9",
                    help="cee-bench settings whose recorded exit layers to replay (comma-separated)")
    ap.add_argument("--journal", type=Path, default=RESULTS / "bench_cpu.rows.jsonl")
    ap.add_argument("--bandwidth-mb", type=int, default=1024)
    ap.add_argument("--attention", default="auto", choices=["auto", "sdpa", "flash"],
                    help="attention kernel (auto: flash-attn when installed, else SDPA)")
    ap.add_argument("--out", type=Path, default=None, help="default: results/gpu_<shape>.jsonl")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA device here: run on a GPU, or pass --device cpu (smoke test)")
    out = args.out or RESULTS / f"gpu_{args.shape}.jsonl"
    a, dtype = SHAPES[args.shape], getattr(torch, args.dtype)
    clock = Clock(dev)
    net = random_model(a, dtype, dev)
    net.attn_impl = flash.choose(args.attention, dev, dtype, a.head_dim)
    wbytes = weight_bytes_per_token(net)
    common = {"machine": machine_info(), "versions": versions(), "commit": git_commit(),
              "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
              "shape": args.shape, "weights": "random (real shapes)", "dtype": args.dtype, "batch": 1,
              "attention": net.attn_impl,
              "repeats": args.repeats, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    recs = [{**common, **bandwidth(dev, clock, args.repeats, args.bandwidth_mb << 20)}]
    bw = recs[0]["read_gbs"]
    modes = [(False, "default")] + ([(True, "default"), (True, "reduce-overhead")] if args.compile else [])
    # with flash-attn chosen, full-depth decode is also timed with SDPA, in the same run, for the ratio
    kernels = [net.attn_impl] + (["sdpa"] if net.attn_impl == "flash" else [])
    for attn in kernels:
        net.attn_impl = attn
        for compiled, mode in modes:
            tok_s, comp = decode_tokens_s(net, compiled, mode, args.prompt_tokens, args.new_tokens,
                                          args.repeats)
            gbs = wbytes * tok_s / 1e9
            recs.append({**common, "kind": "decode", "attention": attn, "compiled": compiled,
                         "compile_mode": mode if compiled else None, "prompt_tokens": args.prompt_tokens,
                         "new_tokens": args.new_tokens, "weight_bytes_per_token": wbytes,
                         "tok_s": round(tok_s, 2), "weight_gbs": round(gbs, 1),
                         "fraction_of_roofline": round(gbs / bw, 3), "compile_s": round(comp, 1)})
    net.attn_impl = kernels[0]
    recs += fill_records(net, clock, args.repeats, common)
    depths = replayed_depths([s for s in args.replay.split(",") if s], a.n_layers, args.new_tokens,
                             args.journal)
    depths[f"static k={a.n_layers // 2}"] = [a.n_layers // 2] * args.new_tokens
    recs += early_exit_records(net, depths, clock, args.repeats, args.prompt_tokens, common)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    for r in recs:
        print(json.dumps({k: v for k, v in r.items() if k not in common}))
    print(f"wrote {len(recs)} records to {out}")


if __name__ == "__main__":
    main()
