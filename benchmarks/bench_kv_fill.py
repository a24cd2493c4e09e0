"""Cost of the KV-cache copy-forward per token, by mode, against running the skipped layers.

    python benchmarks/bench_kv_fill.py                 # SmolLM2-135M shapes, random weights, fp32

Random weights in the default model's real shapes time the same as the real ones (nothing here
depends on values). For one decode token (batch 1) exiting after layer e, we time: the fill of
layers [e, L) in each mode, and running layers [e, L) for real (what the fill replaces). `recompute`
fills nothing at exit time; its cost is paid later, when the next deep token of the row carries the
waiting token through layers [e, L) as an extra query: timed as layers [e, L) with 2 queries minus
with 1. Median of repeats after a warm-up; one JSON object per line appended to --out.
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
from bench_gpu import SHAPES  # noqa: E402

from cee_gen.bench.env import git_commit, machine_info, versions  # noqa: E402
from cee_gen.cache import StaticKVCache  # noqa: E402
from cee_gen.kv_fill import FILL_MODES, KVFiller  # noqa: E402
from cee_gen.model import Transformer  # noqa: E402

SMOLLM2 = SHAPES["smollm2-135m"]


def median_time(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


@torch.inference_mode()
def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "kv_fill_cpu.jsonl")
    args = ap.parse_args(argv)
    a = SMOLLM2
    torch.manual_seed(0)
    net = Transformer(a).eval()
    for p in net.parameters():
        p.normal_(0, 0.02)
    filler = KVFiller(net)
    cache = StaticKVCache(a, 1, 512, torch.float32, "cpu")
    pad = torch.zeros(1, dtype=torch.long)
    slot = 300
    step = net.make_step(torch.tensor([slot]), pad, 512, slot + 1)
    h = torch.randn(1, 1, a.dim)
    common = {"machine": machine_info(), "versions": versions(), "commit": git_commit(),
              "shapes": "SmolLM2-135M (random weights)", "dtype": "float32", "batch": 1,
              "repeats": args.repeats, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    recs = []
    for e in (a.n_layers // 2, 3 * a.n_layers // 4):
        layers_ms = 1e3 * median_time(lambda e=e: net.forward_layers(h, e, a.n_layers, step, cache),
                                      args.repeats)
        recs.append({**common, "exit_layer": e, "skipped_layers": a.n_layers - e,
                     "what": "run skipped layers", "ms": round(layers_ms, 3)})
        step2 = net.make_step(torch.tensor([[slot - 1, slot]]), pad, 512, slot + 1)  # per-row slots
        h2 = torch.randn(1, 2, a.dim)
        two_ms = 1e3 * median_time(
            lambda e=e, h2=h2, s2=step2: net.forward_layers(h2, e, a.n_layers, s2, cache), args.repeats)
        recs.append({**common, "exit_layer": e, "skipped_layers": a.n_layers - e,
                     "what": "recompute (marginal)", "ms": round(two_ms - layers_ms, 3),
                     "fraction_of_skipped_layers": round((two_ms - layers_ms) / layers_ms, 3)})
        for mode in FILL_MODES:
            ms = 1e3 * median_time(lambda m=mode, e=e: filler.fill(cache, h, e, step, m), args.repeats)
            recs.append({**common, "exit_layer": e, "skipped_layers": a.n_layers - e,
                         "what": f"fill {mode}", "ms": round(ms, 3),
                         "fraction_of_skipped_layers": round(ms / layers_ms, 3)})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    for r in recs:
        print(f"exit after {r['exit_layer']:>2} ({r['skipped_layers']} skipped): {r['what']:>22} "
              f"{r['ms']:7.3f} ms  {r.get('fraction_of_skipped_layers', '')}")


if __name__ == "__main__":
    main()
