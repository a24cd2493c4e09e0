"""Verified early exit on the default model: what a verify pass costs, and what each draft source gives.

    python benchmarks/bench_verify.py curve                 # verify pass of k+1 positions vs one step
    python benchmarks/bench_verify.py tasks --limit 12      # Alpaca, Dolly, CNN/DM test rows
    python benchmarks/bench_verify.py exactness --limit 12  # greedy verify == full, kernel vs MKL
    python benchmarks/bench_verify.py lookup --limit 12     # prompt lookup's room, simulated

`curve`: for k = 0..16, the time of one full-depth pass over k + 1 positions of one row (the newest
token and k drafts, from layer 0, as an n-gram verify pass runs) against one plain decode step, both
compiled (and eager with --eager), alternating, median of repeats after a warm-up.

`tasks`: per dataset, the first --limit test rows (chat template, greedy, --new-tokens, EOS respected),
each decoded by: our compiled full depth; our compiled verify mode with each draft source; HF
`generate` with prompt lookup (`prompt_lookup_num_tokens`) and with `assistant_early_exit` on the same
weights; and HF plain `generate` (the baseline HF's speed-ups are over). Settings alternate row by row;
per row and setting the median of --repeats timed runs. Speed-up = median over rows of (baseline
decode time / setting's), decode time = wall time of the whole generation minus the prefill's share
(ours: the engine's own prefill_s; HF: the time to the first token measured by a streamer). Token
agreement with our full depth must be 1.000 for our greedy verify mode.

`exactness`: greedy verify against full depth, eager, with our small-M kernel and with torch's matmul,
counting rows whose tokens differ (see `exactness`).

JSON lines to --out (machine, versions, commit, settings, figures); `python -m cee_gen.bench.report`
renders them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cee_gen.bench.env import git_commit, machine_info, versions  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def common(args) -> dict:
    return {"machine": machine_info(), "versions": versions(), "commit": git_commit(),
            "model": "SmolLM2-135M-Instruct", "dtype": "float32", "batch": 1,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


@torch.inference_mode()
def curve(args) -> list[dict]:
    import cee_gen
    from cee_gen.engine import Decoder
    from cee_gen.engine.verify_pass import COLUMN_BUCKETS, pass_layers, pass_logits

    model = cee_gen.load_model(None, dtype="float32", device="cpu", weights=args.weights)
    net, L = model.net, model.n_layers
    prompt = torch.randint(100, 20000, (1, 200), generator=torch.Generator().manual_seed(0))
    ks = list(range(0, args.max_k + 1))
    out = []
    for compiled in ([True] if not args.eager else [True, False]):
        dec = Decoder(net, compile=compiled)
        cache = dec.new_cache(1, 256)
        pad = torch.zeros(1, dtype=torch.long)
        step = net.make_step(torch.arange(200), pad, 256, 200)
        net.forward_layers(net.embed(prompt), 0, L, step, cache)
        tok = torch.tensor([[7]])

        def plain(dec=dec, cache=cache, tok=tok, pad=pad):
            dec.step(cache, tok, 200, pad)

        def verify(k, dec=dec, cache=cache, pad=pad, compiled=compiled):
            Q = next(c for c in COLUMN_BUCKETS if c > k) if compiled else k + 1  # as the engine pads
            slots = torch.cat([torch.arange(200, 201 + k), torch.full((Q - k - 1,), 255)])[None]  # (1, Q)
            h = net.embed(torch.full((1, Q), 7))
            pass_logits(dec, pass_layers(dec, cache, pad, h, [0], slots, 0, L))

        fns = {"plain": plain, **{k: (lambda k=k: verify(k)) for k in ks}}
        for f in fns.values():  # warm-up: compiles every shape
            f()
            f()
        times = {name: [] for name in fns}
        for _ in range(args.repeats):  # alternating, so drift hits all alike
            for name, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
        base = statistics.median(times["plain"])
        for k in ks:
            med = statistics.median(times[k])
            out.append({"kind": "verify_curve", "compiled": compiled, "k": k, "positions": k + 1,
                        "plain_step_ms": round(base * 1e3, 2), "pass_ms": round(med * 1e3, 2),
                        "pass_over_step": round(med / base, 3), "repeats": args.repeats})
            print(f"{'compiled' if compiled else 'eager'} k={k:2d}: pass {med * 1e3:7.2f} ms, "
                  f"step {base * 1e3:6.2f} ms, ratio {med / base:.2f}", flush=True)
    return out


OURS = {  # setting -> ExitConfig fields (None: full depth); the quick-fit heads carry no LoRA, so every
    # setting runs the same weights as full depth
    "full": None,
    "verify ngram": dict(strategy="full", verify=True, draft="ngram"),
    "verify exit policy": dict(strategy="policy", heads="QUICKFIT", threshold=0.5, verify=True, draft="exit"),
    "verify exit confidence": dict(strategy="confidence", threshold=0.9, min_exit_layer=16,
                                   exit_layers="every:2", verify=True, draft="exit"),
    "verify exit static": dict(strategy="static", exit_layer=20, verify=True, draft="exit"),
    "verify auto": dict(strategy="policy", heads="QUICKFIT", threshold=0.5, verify=True, draft="auto"),
}


@torch.inference_mode()
def tasks(args) -> list[dict]:
    import cee_gen
    from cee_gen.bench.suite import hf_model
    from cee_gen.config import GenerationConfig
    from cee_gen.engine import Decoder, generate_batch
    from cee_gen.generate import prepare_exit

    quick = str(Path(cee_gen.__file__).parent / "heads" / "smollm2-135m-instruct-quickfit.safetensors")
    model = cee_gen.load_model(None, dtype="float32", device="cpu", weights=args.weights)
    tok, eos = model.tokenizer, model.eos_token_ids
    dec = Decoder(model.net, compile=True)
    runs = {}
    for name, kw in OURS.items():
        if name in args.skip:
            continue
        runs[name] = None if kw is None else prepare_exit(
            model, cee_gen.ExitConfig(**{k: (quick if v == "QUICKFIT" else v) for k, v in kw.items()},
                                      max_draft=args.max_draft))
    hf = hf_model(model) if not args.no_hf else None
    cfg = GenerationConfig(max_new_tokens=args.new_tokens)

    def ours(name, ids):
        rows, tm = generate_batch(dec, [ids], cfg, pad_id=model.pad_token_id, eos_ids=eos, exit=runs[name])
        return rows[0].token_ids, tm.decode_s, tm.verify

    def hf_gen(ids, new, **kw):
        x = torch.tensor([ids])
        t0 = time.perf_counter()
        y = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, do_sample=False,
                        eos_token_id=eos, pad_token_id=model.pad_token_id, **kw)
        return y[0, len(ids):].tolist(), time.perf_counter() - t0

    hf_settings = {} if hf is None else {
        "hf": {}, f"hf prompt lookup {args.max_draft}": {"prompt_lookup_num_tokens": args.max_draft},
        f"hf assistant early exit {args.early_exit}": {"assistant_early_exit": args.early_exit}}
    # repetitive, so n-gram drafts reach several lengths and most column buckets compile here
    warm = tok("Repeat twice: one two three four five six seven eight nine ten.",
               add_special_tokens=False)["input_ids"]
    for name in runs:  # compile every graph before timing
        ours(name, warm)
    out = []
    for ds in args.datasets.split(","):
        rows, prompts = _test_prompts(args, ds, tok)
        per = {name: [] for name in [*runs, *hf_settings]}
        for i, text in enumerate(prompts):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            for name in [*runs, *hf_settings]:
                if name.startswith("hf assistant") and i >= args.early_exit_rows:
                    continue
                times, got, vs = [], None, None
                for _ in range(args.repeats):
                    if name in runs:
                        got, dt, vs = ours(name, ids)
                    else:
                        pre = hf_gen(ids, 1, **hf_settings[name])[1]  # the prefill and first token
                        got, total = hf_gen(ids, args.new_tokens, **hf_settings[name])
                        dt = total - pre
                    times.append(dt)
                per[name].append({"row": rows[i].id, "decode_s": statistics.median(times), "tokens": len(got),
                                  "ids": got, "verify": vs})
                print(f"{ds} row {i} {name:28s} {len(got):4d} tokens {statistics.median(times):7.2f} s "
                      + (f"tokens/pass {vs['tokens_per_pass']:.2f}" if vs else ""), flush=True)
        base_ours, base_hf = per.get("full"), per.get("hf")
        for name, recs in per.items():
            if not recs:
                continue
            base = base_hf if name.startswith("hf") else base_ours
            ratios = [b["decode_s"] / r["decode_s"] for b, r in zip(base, recs) if r["decode_s"] > 0]
            agree = [_agreement(b["ids"], r["ids"]) for b, r in zip(base_ours, recs)] if base_ours else []
            v = [r["verify"] for r in recs if r["verify"]]
            rec = {"kind": "verify_task", "dataset": ds, "setting": name, "rows": len(recs),
                   "new_tokens": args.new_tokens, "max_draft": args.max_draft, "repeats": args.repeats,
                   "speedup": round(statistics.median(ratios), 3),
                   "speedup_over": "hf" if name.startswith("hf") else "full",
                   "ms_per_token": round(1e3 * sum(r["decode_s"] for r in recs)
                                         / max(1, sum(r["tokens"] - 1 for r in recs)), 2),
                   "agreement_with_full": round(statistics.mean(agree), 4) if agree else None,
                   "identical_rows": sum(a == 1.0 for a in agree) if agree else None}
            if v:
                passes = sum(x["passes"] for x in v)
                rec.update({
                    "tokens_per_pass": round(sum(x["tokens_per_pass"] * x["passes"] for x in v) / passes, 3),
                    "proposed": {s: sum(x["proposed"][s] for x in v) for s in ("ngram", "exit")},
                    "accepted": {s: sum(x["accepted"][s] for x in v) for s in ("ngram", "exit")},
                    "plain_step_share": round(sum(x["plain_steps"] for x in v) / passes, 3),
                    "draft_s": round(sum(x["draft_s"] for x in v), 3),
                    "verify_s": round(sum(x["verify_s"] for x in v), 3)})
            out.append(rec)
            print(json.dumps({k: rec[k] for k in ("dataset", "setting", "speedup", "agreement_with_full")
                              if k in rec}), flush=True)
    return out


@torch.inference_mode()
def exactness(args) -> list[dict]:
    """Greedy verify (n-gram drafts, batch 1, eager) against full depth on each set's first --limit
    test rows, with the linear layers on our small-M kernel (a row's result does not depend on how many
    rows a call has) and on torch's own matmul (MKL: one reduction order for one row, another for
    several). A token where the two runs differ is a near-tie the verify pass's logits flipped."""
    import cee_gen
    from cee_gen.ops import cpu

    model = cee_gen.load_model(None, dtype="float32", device="cpu", weights=args.weights)
    tok = model.tokenizer
    ex = cee_gen.ExitConfig(verify=True, draft="ngram", max_draft=args.max_draft)
    sets = {ds: _test_prompts(args, ds, tok)[1] for ds in args.datasets.split(",")}
    out = []
    for kernel in (True, False):
        cpu.ready = kernel and cpu.load()  # eager reads it at every call
        for ds, prompts in sets.items():
            diverged, tokens, first = 0, 0, []
            for text in prompts:
                kw = dict(max_new_tokens=args.new_tokens, chat=False, batch_size=1)
                [full] = cee_gen.generate(model, text, **kw)
                [ver] = cee_gen.generate(model, text, exit=ex, **kw)
                tokens += len(full.token_ids)
                if ver.token_ids != full.token_ids:
                    diverged += 1
                    a, b = full.token_ids, ver.token_ids
                    first.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y),
                                      min(len(a), len(b))))
            rec = {"kind": "verify_exactness", "dataset": ds,
                   "linear": "cee_cpu kernel" if kernel else "torch (MKL)",
                   "rows": len(prompts), "new_tokens": args.new_tokens, "tokens": tokens,
                   "rows_diverged": diverged, "first_divergence_at": first}
            print(json.dumps(rec), flush=True)
            out.append(rec)
    cpu.ready = cpu.load()
    return out


@torch.inference_mode()
def lookup(args) -> list[dict]:
    """Prompt lookup simulated on our greedy outputs (no timing): per row, tokens per verify pass when
    every pass drafts k tokens from the longest match (n <= 3), for k = 2, 4, 8: what n-gram drafts
    could give with a free verify pass and no pacer."""
    import cee_gen
    from cee_gen.engine.verify import NgramIndex

    model = cee_gen.load_model(None, dtype="float32", device="cpu", weights=args.weights)
    out = []
    for ds in args.datasets.split(","):
        prompts = _test_prompts(args, ds, model.tokenizer)[1]
        res = cee_gen.generate(model, prompts, max_new_tokens=args.new_tokens, chat=False, batch_size=4)
        per_k = {}
        for k in (2, 4, 8):
            per_row = []
            for r in res:
                o = r.token_ids
                idx, i, passes = NgramIndex(r.prompt_token_ids + o[:1], 3), 1, 0
                while i < len(o):
                    d, a = idx.draft(k), 0
                    while a < len(d) and i + a < len(o) and d[a] == o[i + a]:
                        a += 1
                    for t in o[i:i + a + 1]:
                        idx.append(t)
                    i, passes = i + a + 1, passes + 1
                per_row.append((len(o) - 1) / max(passes, 1))
            per_k[k] = per_row
        rec = {"kind": "verify_lookup", "dataset": ds, "rows": len(res), "new_tokens": args.new_tokens,
               **{f"tokens_per_pass_k{k}": {"median": round(statistics.median(v), 3),
                                            "mean": round(statistics.mean(v), 3), "max": round(max(v), 2)}
                  for k, v in per_k.items()}}
        print(json.dumps(rec), flush=True)
        out.append(rec)
    return out


def _test_prompts(args, ds: str, tok) -> tuple[list, list[str]]:
    """Set `ds`'s first --limit test rows and their prompts (chat template, cut to --max-prompt-tokens)."""
    from cee_gen import data

    rows = data.load_split(ds, "test", args.data_dir, limit=args.limit)
    return rows, [data.render(r, "chat", tok, args.max_prompt_tokens) for r in rows]


def _agreement(ref: list[int], got: list[int]) -> float:
    """Share of the reference's positions where `got` has the same token."""
    return sum(a == b for a, b in zip(ref, got)) / max(len(ref), 1) if len(ref) == len(got) else \
        sum(a == b for a, b in zip(ref, got)) / max(len(ref), len(got), 1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["curve", "tasks", "exactness", "lookup"])
    ap.add_argument("--max-k", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=None, help="timed runs (default: curve 5, tasks 1)")
    ap.add_argument("--eager", action="store_true", help="curve: also the eager engine")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--weights", default="fp", help="as cee-generate --weights (default fp: fp32 floats, "
                    "as the committed results; the library's default is auto)")
    ap.add_argument("--datasets", default="alpaca,dolly,cnndm")
    ap.add_argument("--data-dir", default=None, help="the sets' folder (default: $CEE_GEN_DATA, or the hub)")
    ap.add_argument("--limit", type=int, default=12, help="test rows per set")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--max-prompt-tokens", type=int, default=1024)
    ap.add_argument("--max-draft", type=int, default=8)
    ap.add_argument("--early-exit", type=int, default=20, help="HF assistant_early_exit layer")
    ap.add_argument("--early-exit-rows", type=int, default=3, help="rows per set for HF assistant_early_exit "
                    "(it is slow on this model)")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--skip", default="", help="comma-separated settings of ours to leave out")
    args = ap.parse_args(argv)
    args.repeats = args.repeats or (5 if args.what == "curve" else 1)
    args.skip = [x.strip() for x in args.skip.split(",") if x.strip()]
    torch.manual_seed(0)
    recs = {"curve": curve, "tasks": tasks, "exactness": exactness, "lookup": lookup}[args.what](args)
    c = common(args)
    out = args.out or RESULTS / f"verify_{args.what}_cpu.jsonl"
    with open(out, "a") as f:
        for r in recs:
            f.write(json.dumps({**c, **r}) + "\n")
    print(f"wrote {len(recs)} records to {out}")


if __name__ == "__main__":
    main()
