"""Quickly fitted policy heads: supervised stand-ins until the RL training of ConsistentEE lands.

    python -m cee_gen.exits.quickfit --out heads.safetensors          # default model, ~1-2 min on CPU

What it does (not ConsistentEE's REINFORCE, which is `cee-train`'s job): the model greedily continues a
fixed set of built-in instructions; the continuations are run again teacher-forced, and for every
generated position and candidate layer l the label says whether exiting at l would have been safe:
the logit lens (final norm + LM head) at l and at every deeper candidate layer gives the model's own
full-depth token (the "memorized layer" oracle of ConsistentEE, with the full model's prediction
as the label). Each layer's policy head is a logistic regression on norm(h_l) fitted to that label.
The heads carry no classifier adapters: exits read the logit lens.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from cee_gen.errors import CeeGenError
from cee_gen.model import linear

PROMPTS = [
    "Give three tips for staying healthy.", "What is the capital of France?",
    "Write a haiku about the sea.", "Explain why the sky is blue.",
    "List five fruits that are red.", "How do I boil an egg?",
    "Summarize the plot of Romeo and Juliet in two sentences.", "What is 12 times 7?",
    "Translate 'good morning' into Spanish.", "Write a short poem about autumn.",
    "What are the primary colors?", "Describe a cat to someone who has never seen one.",
    "Name three famous scientists and what they discovered.", "Why do we need sleep?",
    "Give me a recipe for pancakes.", "What is photosynthesis?",
    "Write an email asking for a day off.", "What is the difference between weather and climate?",
    "Suggest a name for a bakery.", "How many days are in a leap year?",
    "Explain what a computer program is.", "Write a sentence using the word 'serendipity'.",
    "What is the largest planet in the solar system?", "Give two reasons to learn a new language.",
    "Describe the water cycle.", "What should I pack for a beach trip?",
    "Tell me a fun fact about octopuses.", "How does a bicycle work?",
    "What is the boiling point of water?", "Write a thank-you note to a teacher.",
    "What are the benefits of reading books?", "Explain gravity in simple terms.",
]


@torch.inference_mode()
def collect(model, layers: list[int], n_prompts: int, new_tokens: int):
    """Features norm(h_l) (N, D) per layer and oracle 'safe to exit' labels (N,) per layer."""
    import cee_gen
    from cee_gen.cache import StaticKVCache, cache_slots

    net, L = model.net, model.n_layers
    results = cee_gen.generate(model, PROMPTS[:n_prompts], max_new_tokens=new_tokens, batch_size=8)
    feats = {x: [] for x in layers}
    correct = {x: [] for x in layers}
    for r in results:
        seq = r.prompt_token_ids + r.token_ids
        P, T = len(r.prompt_token_ids), len(seq)
        if T - P < 2:
            continue
        cache = StaticKVCache.for_net(net, 1, cache_slots(T))
        step = net.make_step(torch.arange(T, device=model.device), torch.zeros(1, dtype=torch.long,
                             device=model.device), cache.n_slots, T)
        h = net.embed(torch.tensor([seq], device=model.device))
        lo, states = 0, {}
        for x in layers + [L]:
            h = net.forward_layers(h, lo, x, step, cache)
            states[x], lo = h[0, P - 1:T - 1], x  # positions that predicted the generated tokens
        target = net.head(states[L]).argmax(-1)  # (n,) the full model's own tokens
        for x in layers:
            z = net.norm(states[x])
            feats[x].append(z.float().cpu())
            correct[x].append((linear(z, net.output).argmax(-1) == target).cpu())
    X = {x: torch.cat(feats[x]) for x in layers}
    ok = torch.stack([torch.cat(correct[x]) for x in layers])  # (n_layers, N)
    # safe at l: l and every deeper candidate agree with the full model (suffix AND over layers)
    safe = ok.flip(0).cummin(0).values.flip(0)
    return X, {x: safe[i].float() for i, x in enumerate(layers)}


def fit_logistic(X: torch.Tensor, y: torch.Tensor, steps: int = 300, wd: float = 1e-3):
    """Logistic regression by full-batch Adam: X (N, D), y (N,) -> (weight (D,), bias)."""
    torch.manual_seed(0)
    w = torch.zeros(X.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    mu, sd = X.mean(0), X.std(0) + 1e-6  # standardize for conditioning, fold back afterwards
    Xs, y = (X.clone() - mu) / sd, y.clone()  # (N, D), (N,); clones: made under inference_mode
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(Xs @ w + b, y) + wd * w.pow(2).sum()
        loss.backward()
        opt.step()
    w_eff = (w / sd).detach()
    return w_eff, (b - (mu * w_eff).sum()).detach()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cee_gen.exits.quickfit", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: the embedded default model)")
    ap.add_argument("--out", required=True, help="heads file to write (.safetensors)")
    ap.add_argument("--exit-layers", default="all", help="candidate layers: all, every:K, or 8,12,16")
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help="built-in prompts to use")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per layer")
    args = ap.parse_args(argv)
    try:
        import cee_gen
        from cee_gen.config import ExitConfig
        from cee_gen.exits.heads import ExitHeads

        if not 1 <= args.prompts <= len(PROMPTS):
            raise CeeGenError(f"--prompts must be in 1..{len(PROMPTS)}")
        model = cee_gen.load_model(args.model, dtype="float32", device="cpu")
        L = model.n_layers
        layers = ExitConfig(exit_layers=args.exit_layers).candidates(L, list(range(1, L)))
        t0 = time.perf_counter()
        print(f"quickfit: generating and teacher-forcing {args.prompts} prompts", file=sys.stderr)
        X, y = collect(model, layers, args.prompts, args.new_tokens)
        heads = ExitHeads(model.net, layers, policy="linear")
        report = {}
        for x in layers:
            w, b = fit_logistic(X[x], y[x], args.steps)
            pol = heads.policies[str(x)].net
            pol.weight.data.copy_(w[None]), pol.bias.data.copy_(b)
            acc = (((X[x] @ w + b) > 0).float() == y[x]).float().mean().item()
            report[x] = {"safe_rate": round(y[x].mean().item(), 4), "train_acc": round(acc, 4)}
        heads.meta["training"] = {
            "method": "quickfit: per-layer logistic regression on logit-lens oracle labels "
                      "(safe = this and every deeper candidate layer give the full model's token); "
                      "not RL", "prompts": args.prompts, "new_tokens": args.new_tokens,
            "positions": int(next(iter(y.values())).numel()), "per_layer": report,
            "command": "python -m cee_gen.exits.quickfit " + " ".join(argv or sys.argv[1:])}
        path = heads.save(args.out, base_name=model.name)
        print(f"quickfit: wrote {path} ({heads.n_params()} parameters, {len(layers)} layers, "
              f"{time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        for x in layers:
            print(f"  layer {x:>3}: safe {report[x]['safe_rate']:.3f}  fit accuracy "
                  f"{report[x]['train_acc']:.3f}", file=sys.stderr)
    except CeeGenError as e:
        print(f"quickfit: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
