"""Static early exit: measured speed-up over full depth vs the ideal, per KV-fill mode.

    python benchmarks/bench_static_exit.py        # default model, eager fp32, batch 1, greedy
    python benchmarks/bench_static_exit.py --weights gguf --out benchmarks/results/static_exit_gguf_cpu.jsonl

Every generated token exits after k layers (k = L/2 and 3L/4); the skipped layers' KV is filled.
The ideal speed-up counts only the layers saved: (L t_layer + t_other) / (k t_layer + t_other), with
t_other (embedding, final norm, LM head, token choice) timed on its own and t_layer from the full-depth
step, so decisions and the KV fill count against us. Settings run interleaved within each repeat;
per-token decode time is the median over repeats after a warm-up. One JSON object per line appended
to --out.
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
from bench_decode import PROMPTS, time_other  # noqa: E402

from cee_gen.bench.env import git_commit, machine_info, versions  # noqa: E402


@torch.inference_mode()
def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--weights", default="fp", help="as cee-generate --weights (fp, gguf, q8_0, ...)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "static_exit_cpu.jsonl")
    args = ap.parse_args(argv)

    import cee_gen
    from cee_gen.config import ExitConfig, GenerationConfig
    from cee_gen.engine import Decoder, generate_batch
    from cee_gen.generate import encode_prompt, prepare_exit

    model = cee_gen.load_model(args.model, dtype="float32", device="cpu", weights=args.weights)
    net, L = model.net, model.n_layers
    ids = encode_prompt(model, PROMPTS[0], None)
    dec = Decoder(net)
    cfg = GenerationConfig(max_new_tokens=args.new_tokens)
    settings = [("full", L, "propagate")]
    for k in (L // 2, 3 * L // 4):
        settings += [("static", k, m) for m in ("propagate", "propagate-raw", "copy-kv")]

    runs = {}
    for kind, k, mode in settings:
        if kind != "full":
            runs[k, mode] = prepare_exit(model, ExitConfig(strategy="static", exit_layer=k, kv_fill=mode))
    fill = {s: [] for s in settings}

    def per_token_s(depth, mode):
        run = runs.get((depth, mode))  # None: the plain full-depth step
        _, tm = generate_batch(dec, [ids], cfg, pad_id=0, eos_ids=[], exit=run)
        if run is not None:
            fill[("static", depth, mode)].append(tm.fill_s / (args.new_tokens - 1))
        return tm.decode_s / (args.new_tokens - 1)

    for s in settings:  # warm-up
        per_token_s(s[1], s[2])
    times = {s: [] for s in settings}
    t_others = []
    for _ in range(args.repeats):
        for s in settings:
            times[s].append(per_token_s(s[1], s[2]))
        t_others += time_other(net, cfg)  # t_other; t_layer comes from the full-depth run
    t_other = statistics.median(t_others)
    t_full = statistics.median(times[settings[0]])
    t_layer = (t_full - t_other) / L
    common = {"machine": machine_info(), "versions": versions(), "commit": git_commit(),
              "model": model.name, "dtype": "float32", "weights": args.weights,
              "engine": "ours (eager, exit_step)", "batch": 1,
              "prompt_tokens": len(ids), "new_tokens": args.new_tokens, "repeats": args.repeats,
              "t_layer_ms": round(1e3 * t_layer, 3), "t_other_ms": round(1e3 * t_other, 3),
              "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    recs = []
    for s in settings:
        kind, k, mode = s
        t = statistics.median(times[s])
        ideal = (L * t_layer + t_other) / (k * t_layer + t_other)
        measured = t_full / t
        recs.append({**common, "exit": kind, "exit_layer": k, "kv_fill": mode if k < L else None,
                     "ms_per_token": round(1e3 * t, 2), "all_ms": [round(1e3 * x, 2) for x in times[s]],
                     "fill_ms_per_token": round(1e3 * statistics.median(fill[s]), 3) if fill[s] else 0.0,
                     "measured_speedup": round(measured, 3), "ideal_speedup": round(ideal, 3),
                     "measured_over_ideal": round(measured / ideal, 3)})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    print(f"t_layer {1e3 * t_layer:.2f} ms, t_other {1e3 * t_other:.2f} ms")
    for r in recs:
        print(f"{r['exit']:>6} k={r['exit_layer']:>2} {str(r['kv_fill']):>13}: "
              f"{r['ms_per_token']:6.2f} ms/token (fill {r['fill_ms_per_token']:.2f}) "
              f"measured x{r['measured_speedup']:.2f} ideal x{r['ideal_speedup']:.2f} "
              f"ratio {r['measured_over_ideal']:.3f}")


if __name__ == "__main__":
    main()
