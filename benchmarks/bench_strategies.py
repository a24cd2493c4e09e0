"""Every exit strategy on the default model: layers used, ideal vs measured speed-up, quality, costs.

    python benchmarks/bench_strategies.py      # default model, eager fp32, batch 1, greedy, ~6 min
    python benchmarks/bench_strategies.py --compile --out benchmarks/results/strategies_compiled_cpu.jsonl

For each setting, the same held-out prompts (not quickfit's) are decoded for a fixed number of tokens
(EOS ignored, so every setting times the same number of steps). Reported per setting, medians over
repeats after a warm-up, settings interleaved within each repeat:
- mean layers per decode token and the ideal speed-up L / mean layers, plus the cost-aware ideal
  (L t_layer + t_other) / (mean t_layer + t_other) with t_layer, t_other from the full-depth run;
- measured speed-up: full-depth ms/token over this setting's ms/token (decisions, exit heads and KV
  fill all count against it), and the time per token in decisions and in KV fill;
- quality against the full model's own output: ROUGE-L F (rouge-score, text up to the first EOS)
  and the fraction of tokens equal to the full model's before the first divergence.
Heads: cee_gen/heads/smollm2-135m-instruct-quickfit.safetensors (quick supervised fit, not RL training).
One JSON object per line appended to --out.
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
from bench_decode import time_other  # noqa: E402

from cee_gen.bench.env import git_commit, machine_info, versions  # noqa: E402

ROOT = Path(__file__).parent.parent
HEADS = str(ROOT / "cee_gen" / "heads" / "smollm2-135m-instruct-quickfit.safetensors")
PROMPTS = [
    "Explain how a rainbow forms.",
    "Write a short story about a robot learning to paint.",
    "What are three uses of baking soda?",
    "Describe the rules of chess in a few sentences.",
    "Why is exercise good for mental health?",
    "Give me a packing list for a weekend hiking trip.",
]


def settings():
    E = dict(exit_layers="every:2", min_exit_layer=16)
    return [
        ("full", dict(strategy="full")),
        ("static k=15", dict(strategy="static", exit_layer=15)),
        ("static k=15 eager fill", dict(strategy="static", exit_layer=15, fill_timing="eager")),
        ("static k=22", dict(strategy="static", exit_layer=22)),
        ("policy t=0.5", dict(strategy="policy", heads=HEADS, threshold=0.5)),
        ("policy t=0.5 eager fill", dict(strategy="policy", heads=HEADS, threshold=0.5, fill_timing="eager")),
        ("policy t=0.99", dict(strategy="policy", heads=HEADS, threshold=0.99)),
        ("policy t=0.99 recompute",
         dict(strategy="policy", heads=HEADS, threshold=0.99, kv_fill="recompute")),
        ("confidence t=0.9", dict(strategy="confidence", threshold=0.9, **E)),
        ("entropy t=0.05", dict(strategy="entropy", threshold=0.05, **E)),
        ("patience n=2", dict(strategy="patience", patience=2, **E)),
        ("saturation t=0.95", dict(strategy="saturation", threshold=0.95, min_exit_layer=16)),
        ("saturation t=0.95 eager fill",
         dict(strategy="saturation", threshold=0.95, min_exit_layer=16, fill_timing="eager")),
        ("hash 24,26,28", dict(strategy="hash", exit_layers="24,26,28")),
        ("cascade k=24 t=0.9", dict(strategy="cascade", exit_layer=24, threshold=0.9)),
    ]


def agree_prefix(a: list[int], b: list[int]) -> float:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n / max(len(b), 1)


@torch.inference_mode()
def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "strategies_cpu.jsonl")
    ap.add_argument("--weights", default="fp", help="as cee-generate --weights (default fp: fp32 floats, "
                    "as the committed results; the library's default is auto)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile: the plain step for full/static, the layers and exit heads of the "
                         "early-exit step for the others (compile time excluded)")
    args = ap.parse_args(argv)

    from rouge_score import rouge_scorer

    import cee_gen
    from cee_gen.config import ExitConfig, GenerationConfig
    from cee_gen.engine import Decoder, generate_batch
    from cee_gen.generate import encode_prompt, prepare_exit

    model = cee_gen.load_model(args.model, dtype="float32", device="cpu", weights=args.weights)
    net, L, tok = model.net, model.n_layers, model.tokenizer
    prompts = [encode_prompt(model, p, None) for p in PROMPTS[:args.prompts]]
    dec = Decoder(net, compile=args.compile)
    cfg = GenerationConfig(max_new_tokens=args.new_tokens)
    runs = {name: (None if kw["strategy"] == "full" else prepare_exit(model, ExitConfig(**kw)))
            for name, kw in settings()}
    head = None
    if args.compile:  # the LM head as the compiled exit step runs it
        def head(h):
            return dec.exit_logits(net.norm, None, net.output, h[:, -1])

    def run(name):
        """All prompts one by one: total decode s, decision s, fill s, per-prompt outputs."""
        tot = dec_s = fill_s = 0.0
        outs = []
        for ids in prompts:
            rows, tm = generate_batch(dec, [ids], cfg, pad_id=0, eos_ids=[], exit=runs[name])
            tot, dec_s, fill_s = tot + tm.decode_s, dec_s + tm.decision_s, fill_s + tm.fill_s
            outs.append(rows[0])
        steps = len(prompts) * (args.new_tokens - 1)
        return tot / steps, dec_s / steps, fill_s / steps, outs

    names = [n for n, _ in settings()]
    for n in names:  # warm-up: one prompt each
        generate_batch(dec, [prompts[0]], GenerationConfig(max_new_tokens=4), pad_id=0, eos_ids=[],
                       exit=runs[n])
    res = {n: [] for n in names}
    t_others = []
    for _ in range(args.repeats):
        for n in names:
            res[n].append(run(n))
            print(f"  {n}: {1e3 * res[n][-1][0]:.1f} ms/token", file=sys.stderr)
        t_others += time_other(net, cfg, head=head)  # t_other; t_layer comes from the full-depth run
    t_other = statistics.median(t_others)
    t_full = statistics.median(r[0] for r in res["full"])
    t_layer = (t_full - t_other) / L

    eos = set(model.eos_token_ids)

    def text(ids):
        cut = next((i for i, t in enumerate(ids) if t in eos), len(ids))
        return tok.decode(ids[:cut], skip_special_tokens=True)

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    full_outs = res["full"][0][3]
    common = {"machine": machine_info(), "versions": versions(), "commit": git_commit(),
              "model": model.name, "dtype": "float32",
              "engine": "ours (compiled)" if args.compile else "ours (eager)", "batch": 1,
              "prompts": len(prompts), "new_tokens": args.new_tokens, "repeats": args.repeats,
              "t_layer_ms": round(1e3 * t_layer, 3), "t_other_ms": round(1e3 * t_other, 3),
              "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    recs = []
    for (name, kw) in settings():
        t = statistics.median(r[0] for r in res[name])
        outs = res[name][0][3]
        layers = [d for o in outs for d in o.layers_per_token[1:]]  # decode tokens only
        mean = sum(layers) / len(layers)
        rouge = statistics.mean(scorer.score(text(f.token_ids), text(o.token_ids))["rougeL"].fmeasure
                                for o, f in zip(outs, full_outs))
        recs.append({**common, "setting": name, "exit": {k: v for k, v in kw.items() if k != "heads"},
                     "heads": "quickfit" if "heads" in kw else None,
                     "kv_fill": runs[name].kv_fill if runs[name] else None,
                     "fill_timing": (("deferred" if runs[name].deferred else "eager")
                                     if runs[name] and runs[name].kv_fill == "propagate" else None),
                     "ms_per_token": round(1e3 * t, 2),
                     "all_ms": [round(1e3 * r[0], 2) for r in res[name]],
                     "decision_ms_per_token": round(1e3 * statistics.median(r[1] for r in res[name]), 3),
                     "fill_ms_per_token": round(1e3 * statistics.median(r[2] for r in res[name]), 3),
                     "mean_layers": round(mean, 2), "ideal_speedup": round(L / mean, 3),
                     "ideal_speedup_cost_aware":
                         round((L * t_layer + t_other) / (mean * t_layer + t_other), 3),
                     "measured_speedup": round(t_full / t, 3),
                     "rougeL_vs_full": round(rouge, 3),
                     "prefix_agreement_vs_full": round(statistics.mean(
                         agree_prefix(o.token_ids, f.token_ids) for o, f in zip(outs, full_outs)), 3),
                     "sample": text(outs[0].token_ids)[:160]})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    print(f"t_layer {1e3 * t_layer:.2f} ms, t_other {1e3 * t_other:.2f} ms")
    print(f"{'setting':>24} {'ms/tok':>7} {'layers':>6} {'ideal':>6} {'cost-ideal':>10} {'measured':>8} "
          f"{'decide':>7} {'fill':>5} {'ROUGE-L':>7} {'prefix':>6}")
    for r in recs:
        print(f"{r['setting']:>24} {r['ms_per_token']:7.2f} {r['mean_layers']:6.2f} "
              f"{r['ideal_speedup']:6.2f} "
              f"{r['ideal_speedup_cost_aware']:10.2f} {r['measured_speedup']:8.2f} "
              f"{r['decision_ms_per_token']:7.2f} {r['fill_ms_per_token']:5.2f} {r['rougeL_vs_full']:7.3f} "
              f"{r['prefix_agreement_vs_full']:6.2f}")


if __name__ == "__main__":
    main()
