"""Trained exit heads on a held-out split: ROUGE-L against the references, layers used, speed.

    python benchmarks/eval_policy.py --heads H.safetensors --dataset alpaca --split dev --n 20

Greedy, batch 1, the same prompts for every setting, EOS respected (outputs are compared with the
references, so each run stops where the model stops; ms/token is over the tokens each run made).
Settings: `full`, the model with the heads file loaded (its LoRA deltas merged, if it has any) at
full depth; `base full`, the original model at full depth (no heads, so no LoRA deltas); then each
strategy in --strategies at each threshold, with the same heads and weights as `full`. ROUGE-L F
(rouge-score, stemming on) of the text up to the first EOS, x100, and the token agreement with
`full`'s output. One JSON object per line appended to --out. A quick check of one heads file on one
split; `cee-bench` (cee_gen/bench/) is the harness: every set, dev calibration, HF in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from cee_gen.bench.env import git_commit, machine_info, versions  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--heads", required=True)
    ap.add_argument("--dataset", default="alpaca")
    ap.add_argument("--split", default="dev", choices=("dev", "test"))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--template", default="chat")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--strategies", default="policy:0.5,policy:0.9,confidence:0.9,entropy:0.1")
    ap.add_argument("--exit-layers", default=None)
    ap.add_argument("--skip-base", action="store_true", help="leave out the original model's full-depth run")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "policy_eval_cpu.jsonl")
    args = ap.parse_args(argv)

    import cee_gen
    from cee_gen import data
    from cee_gen.bench.metrics import rouge_f, token_agreement
    from cee_gen.config import ExitConfig
    from cee_gen.engine import exit_histogram

    base = cee_gen.load_model(args.model, dtype="float32", device="cpu")
    model = cee_gen.load_model(args.model, dtype="float32", device="cpu")  # gets the heads' LoRA
    rows = data.load_split(args.dataset, args.split, args.data_dir, limit=args.n)
    prompts = [data.render(r, args.template, model.tokenizer) for r in rows]
    settings = [("full", None)] + ([] if args.skip_base else [("base full", None)])
    settings += [(s.split(":")[0], float(s.split(":")[1])) for s in args.strategies.split(",") if s]
    common = {"machine": machine_info(), "versions": versions(), "commit": git_commit(), "model": model.name,
              "heads": args.heads, "dataset": args.dataset, "split": args.split, "rows": len(rows),
              "row_ids": [r.id for r in rows], "template": args.template, "new_tokens": args.new_tokens,
              "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    recs = []
    full_ids, full_ms = None, None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name, t in settings:  # each setting's record is written as soon as it is done
        m = base if name == "base full" else model
        layers = None if name == "full" else args.exit_layers
        ex = None if name == "base full" else ExitConfig(strategy=name, threshold=t, heads=args.heads,
                                                          exit_layers=layers)
        cee_gen.generate(m, prompts[:1], max_new_tokens=4, chat=False, exit=ex)  # warm-up
        res = cee_gen.generate(m, prompts, max_new_tokens=args.new_tokens, chat=False, batch_size=1,
                               exit=ex)
        if name == "full":
            full_ids = [o.token_ids for o in res]
        agree = None if full_ids is None else statistics.mean(
            token_agreement(o.token_ids, f) for o, f in zip(res, full_ids))
        rouge = statistics.mean(rouge_f(o.text, r.reference)["rougeL"] for r, o in zip(rows, res))
        layers = [d for o in res for d in o.stats["layers_per_token"][1:]]
        mean = sum(layers) / max(len(layers), 1)
        ms = 1e3 * sum(o.stats["decode_s"] for o in res) / max(sum(len(o.token_ids) - 1 for o in res), 1)
        recs.append({**common, "setting": name if t is None else f"{name} t={t}",
                     "weights": res[0].stats["weights"], "rougeL": round(100 * rouge, 2),
                     "token_agreement": None if agree is None else round(agree, 4),
                     "mean_layers": round(mean, 2), "ideal_speedup": round(model.n_layers / mean, 3),
                     "ms_per_token": round(ms, 2), "exit_histogram": exit_histogram(layers)})
        if name == "full":
            full_ms = ms
        recs[-1]["measured_speedup"] = round(full_ms / ms, 3)
        print(f"{recs[-1]['setting']:>18}: ROUGE-L {recs[-1]['rougeL']:6.2f}  layers {mean:5.2f}  "
              f"{ms:6.1f} ms/token  agreement {recs[-1]['token_agreement']}", file=sys.stderr)
        with args.out.open("a") as f:
            f.write(json.dumps(recs[-1]) + "\n")


if __name__ == "__main__":
    main()
