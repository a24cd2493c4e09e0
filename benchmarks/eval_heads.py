"""Exit heads teacher-forced on a held-out split: how early each layer's classifier is right.

    python benchmarks/eval_heads.py --heads A.safetensors B.safetensors --split dev --n 48

For each heads file (loaded into its own copy of the model, so its LoRA deltas apply to it alone),
the split's rows (prompt + reference) run at full depth. At every response position the tool asks
each candidate layer's classifier for its token and reports, against the full model's own token
(what an exit must reproduce) and against the gold token:
- per-layer top-1 agreement;
- the mean memorized layer (the first layer from which every deeper classifier is right), which
  bounds what any exit policy can save without changing the output;
- per layer, the AUROC of the exit signal of `entropy` (low normalized entropy) for "this
  classifier is right": how well a threshold on it can tell safe exits from wrong ones (what COSEE's
  signal calibration trains for).
One JSON object per heads file appended to --out. Used to compare training targets (gold vs self).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from cee_gen.bench.env import git_commit, machine_info, versions  # noqa: E402


def _auroc(score: torch.Tensor, positive: torch.Tensor) -> float | None:
    """P(score of a positive > score of a negative), ties half (Mann-Whitney); None if one class is empty."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return None
    order = score.argsort()
    ranks = torch.empty_like(score, dtype=torch.float64)
    ranks[order] = torch.arange(1, len(score) + 1, dtype=torch.float64)
    for v in score[order].unique_consecutive():  # average ranks over ties
        tie = score == v
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return round(((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item(), 4)


@torch.no_grad()
def evaluate(model, heads, seqs, batch_size: int = 4) -> dict:
    from cee_gen.train import objectives as ob
    from cee_gen.train.stages import collect_states

    net, L = model.net, model.n_layers
    layers = heads.layers
    out = {}
    X, gold, own = collect_states(net, seqs, model.pad_token_id, layers, batch_size)
    logits = {x: heads.logits(x, X[x]) for x in layers}  # (N, V) per candidate layer
    entropy = {x: ob.normalized_entropy(z) for x, z in logits.items()}  # the signal COSEE calibrates
    for name, y in (("own", own), ("gold", gold)):
        right = {x: z.argmax(-1) == y for x, z in logits.items()}
        correct = torch.stack([right[x] for x in layers] + [own == y])
        m = ob.memorized_layer(correct, layers + [L])
        out[name] = {"agreement_per_layer": dict(zip(layers + [L], [round(v, 4) for v in
                                                                   correct.float().mean(1).tolist()])),
                     "mean_memorized_layer": round(m.float().mean().item(), 3),
                     "entropy_auroc_per_layer": {x: _auroc(-entropy[x], right[x]) for x in layers}}
    out["positions"] = int(own.numel())
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--heads", nargs="+", required=True)
    ap.add_argument("--dataset", default="alpaca")
    ap.add_argument("--split", default="dev", choices=("dev", "test"))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--template", default="chat")
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--max-seq-tokens", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "heads_eval_cpu.jsonl")
    args = ap.parse_args(argv)

    import cee_gen
    from cee_gen.exits.heads import load_heads
    from cee_gen.train.config import TrainConfig
    from cee_gen.train.trainer import prepare

    args.out.parent.mkdir(parents=True, exist_ok=True)
    for path in args.heads:
        model = cee_gen.load_model(args.model, dtype="float32", device="cpu")
        heads = load_heads(path, model)  # merges its LoRA into this copy
        seqs = prepare(model, TrainConfig(out="-", dataset=args.dataset, data_dir=args.data_dir,
                                          template=args.template, max_examples=args.n,
                                          max_seq_tokens=args.max_seq_tokens), split=args.split)
        res = evaluate(model, heads, seqs)
        training = heads.meta.get("training", {}).get("config", {})
        rec = {"heads": path, "target": training.get("target"), "lora_rank": training.get("lora_rank"),
               "dataset": args.dataset, "split": args.split, "rows": len(seqs), **res,
               "machine": machine_info(), "versions": versions(), "commit": git_commit(),
               "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        print(f"{path}: memorized layer vs own {res['own']['mean_memorized_layer']}, vs gold "
              f"{res['gold']['mean_memorized_layer']} ({res['positions']} positions)", file=sys.stderr)
        with args.out.open("a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
