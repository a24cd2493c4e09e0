"""Full-depth decode speed: cee-gen vs HF transformers `generate`, same prompts, same run.

    python benchmarks/bench_decode.py                       # default model, fp32, 128 new tokens
    python benchmarks/bench_decode.py --engines hf,ours,ours-compiled --repeats 5

Batch 1, greedy, exactly `--new-tokens` tokens per prompt (EOS ignored by both engines so they do
the same work). Each repeat runs every engine once on every prompt, interleaved, so drift on a shared
machine hits all engines alike; we report the median over repeats after one warm-up run per engine
and prompt. `torch.compile` time is measured and reported separately (paid once per process; the
on-disk Inductor cache makes later processes cheaper).

Also measured: the machine's memory bandwidth (a large `sum`), and from it the batch-1 roofline:
bytes of weights read per token / bandwidth. Batch-1 decode reads every weight once per token, so
that is the speed limit of any exact fp32 engine on this machine.

Output: one JSON object per line (--out, default benchmarks/results/decode_cpu.jsonl), appended.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from cee_gen.bench.env import git_commit, machine_info, versions

PROMPTS = [
    "Give three tips for staying healthy.",
    "Write a short story about a robot who learns to paint, in about a hundred words.",
    "Summarize the following text in two sentences.\n\n" + (
        "The history of computing is longer than the history of computing hardware and modern "
        "computing technology and includes the history of methods intended for pen and paper or for "
        "chalk and slate, with or without the aid of tables. Digital computing is intimately tied to "
        "the representation of numbers. But long before abstractions like the number arose, there "
        "were mathematical concepts to serve the purposes of civilization. ") * 4,
]


def measure_bandwidth_gbs(n_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Read bandwidth from a large fp32 sum (median of repeats), in GB/s."""
    x = torch.ones(n_bytes // 4)
    x.sum()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return n_bytes / statistics.median(times) / 1e9


def weight_bytes_per_token(net) -> int:
    """Bytes of weights one batch-1 decode step reads: all layers, final norm, LM head (once if tied),
    in whatever format they are (floats, or GGUF blocks: weights/lowbit.py). The embedding lookup reads
    one row, so it is not counted (a tied head counts once, as the head)."""
    seen, total = set(), 0
    for name, mod in net.named_modules():
        if name == "tok_embeddings":
            continue
        blocks = [b for n, b in mod.named_buffers(recurse=False) if n in ("qs", "d", "m") and b is not None]
        tensors = [*mod.parameters(recurse=False), *blocks]
        for t in tensors:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def time_other(net, cfg, n: int = 20, head=None) -> list[float]:
    """n timings of everything in a decode step but the layers: embedding, final norm + LM head,
    token choice (t_other of the early-exit benchmarks). `head(h)`: the LM head as the decoder runs
    it (default: eager)."""
    from cee_gen.sampling import select_next

    head = head or (lambda h: net.head(h)[:, -1].float())

    h = torch.randn(1, 1, net.args.dim, dtype=net.dtype)
    seen = torch.zeros(1, net.args.vocab_size, dtype=torch.bool)
    tok = torch.tensor([[5]])
    out = []
    with torch.inference_mode():
        for _ in range(n):
            t = time.perf_counter()
            net.embed(tok)
            select_next(head(h), cfg, seen, None)
            out.append(time.perf_counter() - t)
    return out


def run_ours(decoder, ids: list[int], n: int) -> tuple[float, list[int], float]:
    from cee_gen.config import GenerationConfig
    from cee_gen.engine import generate_batch

    cfg = GenerationConfig(max_new_tokens=n)
    t = time.perf_counter()
    rows, tm = generate_batch(decoder, [ids], cfg, pad_id=0, eos_ids=[])
    wall = time.perf_counter() - t - tm.compile_s
    return wall, rows[0].token_ids, tm.compile_s


def run_hf(hf, ids: list[int], n: int) -> tuple[float, list[int], float]:
    x = torch.tensor([ids])
    t = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0, use_cache=True)
    return time.perf_counter() - t, out[0, len(ids):].tolist(), 0.0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint folder or .gguf (default: default model)")
    ap.add_argument("--engines", default="hf,ours,ours-compiled")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help="use the first N prompts")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decode_cpu.jsonl")
    ap.add_argument("--weights", default="fp", help="as cee-generate --weights (default fp: fp32 floats, "
                    "as the committed results; the library's default is auto)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import cee_gen
    from cee_gen.engine import Decoder
    from cee_gen.generate import encode_prompt

    engines = args.engines.split(",")
    model = cee_gen.load_model(args.model, dtype=args.dtype, device="cpu", weights=args.weights)
    prompts = [encode_prompt(model, p, None) for p in PROMPTS[:args.prompts]]
    runners = {}
    if "hf" in engines:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(model.path, dtype=getattr(torch, args.dtype)).eval()
        runners["hf"] = lambda ids: run_hf(hf, ids, args.new_tokens)
    for name, compiled in (("ours", False), ("ours-compiled", True)):
        if name in engines:
            dec = Decoder(model.net, compile=compiled)
            runners[name] = lambda ids, dec=dec: run_ours(dec, ids, args.new_tokens)

    bw = measure_bandwidth_gbs()
    wbytes = weight_bytes_per_token(model.net)
    common = {"machine": machine_info(), "versions": versions(), "commit": git_commit(),
              "model": model.name, "dtype": args.dtype, "batch": 1, "greedy": True,
              "new_tokens": args.new_tokens, "repeats": args.repeats,
              "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    records = [{**common, "kind": "roofline", "bandwidth_gbs": round(bw, 2),
                "weight_bytes_per_token": wbytes, "roofline_tok_s": round(bw * 1e9 / wbytes, 2)}]
    print(json.dumps(records[0]), file=sys.stderr)

    compile_s = {e: 0.0 for e in runners}
    tokens = {}
    for p_i, ids in enumerate(prompts):  # warm-up: one run per engine and prompt (compiles here)
        for e, run in runners.items():
            _, toks, c = run(ids)
            compile_s[e] += c
            tokens[(e, p_i)] = toks
    times = {(e, p): [] for e in runners for p in range(len(prompts))}
    for r in range(args.repeats):
        for p_i, ids in enumerate(prompts):
            for e, run in runners.items():
                wall, toks, _ = run(ids)
                times[(e, p_i)].append(wall)
                print(f"repeat {r} prompt {p_i} ({len(ids)} tok) {e}: "
                      f"{args.new_tokens / wall:.2f} tok/s", file=sys.stderr)

    for p_i, ids in enumerate(prompts):
        base = statistics.median(times[("hf", p_i)]) if "hf" in runners else None
        for e in runners:
            med = statistics.median(times[(e, p_i)])
            rec = {**common, "kind": "decode", "engine": e, "prompt_index": p_i,
                   "prompt_tokens": len(ids), "median_s": round(med, 4),
                   "all_s": [round(t, 4) for t in times[(e, p_i)]],
                   "tok_s": round(args.new_tokens / med, 2),
                   "ms_per_token": round(1000 * med / args.new_tokens, 2),
                   "achieved_weight_gbs": round(wbytes * args.new_tokens / med / 1e9, 2),
                   "compile_s": round(compile_s[e], 1)}
            if base is not None:
                rec["speedup_vs_hf"] = round(base / med, 3)
                ref = tokens[("hf", p_i)]
                rec["token_agreement_vs_hf"] = sum(a == b for a, b in zip(ref, tokens[(e, p_i)])) / len(ref)
            records.append(rec)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    for rec in records[1:]:
        print(f"{rec['engine']:>14} prompt {rec['prompt_tokens']:>4} tok: {rec['tok_s']:6.2f} tok/s "
              f"x{rec.get('speedup_vs_hf', float('nan')):.2f} vs HF, "
              f"agreement {rec.get('token_agreement_vs_hf', float('nan')):.3f}")
    print(f"wrote {len(records)} records to {args.out}")


if __name__ == "__main__":
    main()
