"""A soak: many short generations in one process, across strategies, verify mode, sampling and batch
sizes; resident memory after warm-up against the end, sampled after each cycle of cases. A leak (a cache
that keeps every shape, a list that grows per call) shows as growth; the bound is 5 %.

    python -m cee_gen.bench.soak                    # default model, shipped heads, 1,000 generations
    python -m cee_gen.bench.soak --weights fp --out benchmarks/results/soak_cpu.jsonl

Writes one JSON line (appended to --out): resident memory (current, from /proc, not the peak, after a
garbage collection) after the warm-up rounds and at the end, the growth, the largest sample, the
trend over the samples, and the time taken. tests/test_fuzz.py runs the same soak on
a tiny model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

PROMPTS = ["the quick brown fox", "a b a b a b", "hello there", "one two three four"]


def rss_mb() -> float:
    """Current resident set size in MB (Linux /proc; elsewhere the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def exits(heads: str | None, n_layers: int) -> list:
    from cee_gen import ExitConfig

    mid = max(1, n_layers // 2)
    return [ExitConfig(), ExitConfig(strategy="static", exit_layer=mid),
            ExitConfig(strategy="policy", heads=heads, threshold=0.5),
            ExitConfig(strategy="confidence", threshold=0.5, kv_fill="copy-kv"),
            ExitConfig(strategy="entropy", threshold=0.5, kv_fill="recompute"),
            ExitConfig(strategy="cascade", exit_layer=mid, threshold=0.5),
            ExitConfig(verify=True, draft="ngram"),
            ExitConfig(strategy="confidence", threshold=0.5, verify=True, draft="auto")]


def soak(model, heads: str | None, rounds: int = 1000, warm: int = 100, new_tokens: int = 4) -> dict:
    """`rounds` generate() calls, every exit case at every batch size 1..4 in turn; resident memory
    after `warm` rounds and then after each full cycle of cases x batch sizes (garbage collected first),
    with the least-squares slope over those samples (MB per 100 rounds)."""
    import gc

    import cee_gen
    from cee_gen import GenerationConfig

    cases = exits(heads, model.n_layers)
    cycle = 4 * len(cases)

    def round_(i):
        n = 1 + (i // len(cases)) % 4  # each case meets every batch size
        cfg = GenerationConfig(max_new_tokens=new_tokens, batch_size=n, do_sample=i % 3 == 0, seed=i)
        res = cee_gen.generate(model, PROMPTS[:n], config=cfg, exit=cases[i % len(cases)])
        if len(res) != n:
            raise AssertionError(f"round {i}: {len(res)} results for {n} prompts")

    def sample() -> float:
        gc.collect()
        return rss_mb()

    t = time.perf_counter()
    for i in range(warm):
        round_(i)
    samples = [(warm, sample())]
    for i in range(warm, rounds):
        round_(i)
        if (i + 1 - warm) % cycle == 0 or i + 1 == rounds:
            samples.append((i + 1, sample()))
    after_warm, end = samples[0][1], samples[-1][1]
    xs, ys = [x for x, _ in samples], [y for _, y in samples]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    return {"rounds": rounds, "warm_rounds": warm, "new_tokens": new_tokens, "cases": len(cases),
            "rss_after_warmup_mb": round(after_warm, 1), "rss_end_mb": round(end, 1),
            "rss_max_mb": round(max(ys), 1), "growth_mb": round(end - after_warm, 1),
            "growth_pct": round(100 * (end - after_warm) / after_warm, 2),
            "slope_mb_per_100_rounds": round(100 * slope, 2), "samples": len(samples),
            "seconds": round(time.perf_counter() - t, 1)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: the default model)")
    ap.add_argument("--weights", default="auto", help="as cee-generate --weights (auto: the default)")
    ap.add_argument("--rounds", type=int, default=1000)
    ap.add_argument("--warm", type=int, default=100)
    ap.add_argument("--out", type=Path, default=None, help="append the record to this JSON Lines file")
    args = ap.parse_args(argv)

    import cee_gen
    from cee_gen.bench.env import git_commit, machine_info, versions
    from cee_gen.generate import shipped_heads

    model = cee_gen.load_model(args.model, device="cpu", weights=args.weights)
    rec = {"kind": "soak", "model": model.name, "weights": args.weights, "machine": machine_info(),
           "versions": versions(), "commit": git_commit(),
           "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           **soak(model, shipped_heads(model), args.rounds, args.warm)}
    rec["within_5_pct"] = rec["growth_pct"] < 5
    print(json.dumps(rec))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
