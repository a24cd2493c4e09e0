"""Low-bit weights on the CPU: batch-1 decode of HF fp32, ours fp32 (eager and compiled), ours in GGUF
blocks, and llama.cpp on the very same GGUF file, in one run.

    python benchmarks/bench_lowbit.py                                  # all engines, 128 tokens, 2 threads
    python benchmarks/bench_lowbit.py --engines ours-gguf,llama.cpp --repeats 5
    python benchmarks/bench_lowbit.py --memory                         # peak RSS of one-shot processes

Engines: `hf` (transformers generate, fp32), `ours-fp` (fp32, the default eager path: one fused op per
layer, csrc/cpu/layer.cpp), `ours-fp-compiled` (fp32, --compile: the layers through their modules,
traced by Inductor), `ours-gguf` (the GGUF's own blocks: Q4_1 layers, Q8_0 head; the default eager
path), `ours-q8_0` (every projection and the head RTN-quantized to Q8_0 from fp32), `llama.cpp`
(llama-cpp-python 0.3.36 on the same GGUF; benchmark-only: `pip install -e ".[bench]"`, built from source,
~10 min; skipped with a message when absent).

Batch 1, greedy, exactly --new-tokens tokens (EOS ignored by every engine), the same prompt token ids
for all; each timing is the whole call, prefill included, as llama.cpp's is. Each repeat runs every
engine once per prompt, alternating; medians over repeats after one warm-up run per engine and prompt
(compiles there). Reported beside each: weight bytes read per token, GB/s of weights achieved, and the
roofline (bytes per token / measured read bandwidth). Token agreement is against ours fp32: `ours-gguf`
must be 1.0 (the same weights), llama.cpp quantizes its activations to 8 bits and need not be.

--memory runs `cee-generate` (16 tokens, default model) with --weights fp and gguf, and llama.cpp on the
GGUF, each as its own process, and reports peak resident memory (ru_maxrss), beside the import-only
baseline (python -c "import torch, transformers, cee_gen").

--quality runs `cee-bench`'s CPU preset at full depth (10 test rows per set, 32 tokens) with weights fp
and each RTN format of --formats, and reports each format's ROUGE-L against fp32's on the same rows: the
mean paired difference and its standard error, and how many rows give fp32's very tokens (the data:
--data-dir or $CEE_GEN_DATA, docs/benchmarks.md).

Output: JSON lines appended to --out (default benchmarks/results/lowbit_cpu.jsonl).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_decode import PROMPTS, measure_bandwidth_gbs, run_hf, run_ours, weight_bytes_per_token

from cee_gen.bench.env import git_commit, machine_info, versions

ENGINES = ("hf", "ours-fp", "ours-fp-compiled", "ours-gguf", "ours-q8_0", "llama.cpp")
OURS = {"ours-fp": ("fp", False), "ours-fp-compiled": ("fp", True), "ours-gguf": ("gguf", False),
        "ours-q8_0": ("q8_0", False)}  # engine: (weights, compile)


def llama_cpp_runner(gguf: Path, threads: int, n: int, n_ctx: int):
    """A run(ids) for llama-cpp-python on `gguf`, or (None, why) when it is not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None, ("llama-cpp-python is not installed (benchmark-only: pip install "
                      "llama-cpp-python==0.3.36, built from source, ~10 min)")
    llm = Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                n_batch=512, verbose=False)

    def run(ids: list[int]) -> tuple[float, list[int], float]:
        out = []
        t = time.perf_counter()
        for tok in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(tok)
            if len(out) == n:
                break
        return time.perf_counter() - t, out, 0.0

    return run, None


def peak_rss_mb(argv: list[str]) -> float:
    """Peak resident memory (MB) of a process running argv, which must succeed: measured by a fresh
    wrapper process, whose only child it is (ru_maxrss of children is a maximum over all of them)."""
    wrap = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, "
            "stderr=subprocess.PIPE, text=True); print(r.returncode, resource.getrusage("
            "resource.RUSAGE_CHILDREN).ru_maxrss); print(r.stderr[-500:], file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", wrap, *argv], capture_output=True, text=True)
    rc, kb = proc.stdout.split()
    if rc != "0":
        raise SystemExit(f"{' '.join(argv[:4])} failed: {proc.stderr.strip()}")
    return int(kb) / 1024


def memory(gguf: Path, common: dict) -> list[dict]:
    py = sys.executable
    gen = [py, "-m", "cee_gen.cli", "--max-new-tokens", "16", "Give three tips for staying healthy.",
           "--weights"]
    runs = [("import only", [py, "-c", "import torch, transformers, cee_gen"]),
            ("ours gguf", gen + ["gguf"]), ("ours fp", gen + ["fp"])]
    try:
        import llama_cpp  # noqa: F401

        runs.append(("llama.cpp", [py, "-c", "import sys; from llama_cpp import Llama; m = Llama(model_path="
                     "sys.argv[1], n_threads=2, n_ctx=512, verbose=False); m('Give three tips for staying "
                     "healthy.', max_tokens=16, temperature=0)", str(gguf)]))
    except ImportError:
        print("llama.cpp: skipped (llama-cpp-python not installed)", file=sys.stderr)
    recs = []
    for name, argv in runs:
        mb = peak_rss_mb(argv)
        print(f"{name}: peak RSS {mb:.0f} MB", file=sys.stderr)
        recs.append({**common, "kind": "memory", "engine": name, "peak_rss_mb": round(mb, 1),
                     "new_tokens": 16})
    return recs


def quality(args, common: dict) -> list[dict]:
    import tempfile

    from cee_gen import data
    from cee_gen.bench import metrics
    from cee_gen.bench.config import BenchConfig
    from cee_gen.bench.suite import run
    from cee_gen.bench.summary import _texts_for_scoring

    tmp = Path(tempfile.mkdtemp())
    outputs = {}  # weights -> {(set, row): the journal's record}
    for w in ["fp", *args.formats.split(",")]:
        cfg = BenchConfig(preset="cpu", weights=w, strategies="", hf=False, base=False,
                          data_dir=args.data_dir, out=str(tmp / f"{w}.jsonl")).resolved()
        run(cfg, progress=False)
        lines = [json.loads(x) for x in (tmp / f"{w}.rows.jsonl").read_text().splitlines()[1:]]
        outputs[w] = {(r["dataset"], r["row"]): r for r in lines if r["split"] == "test"}
        limit = cfg.limit
    recs = []
    for ds in ("alpaca", "dolly", "cnndm"):
        refs = {r.id: r.reference for r in data.load_split(ds, "test", args.data_dir, limit=limit)}
        score = {(w, r): 100 * metrics.rouge_f(_texts_for_scoring(ds, outputs[w][(ds, r)]["text"]),
                                               refs[r])["rougeL"] for w in outputs for r in refs}
        for w in args.formats.split(","):
            diff = [score[w, r] - score["fp", r] for r in refs]
            rec = {**common, "kind": "quality", "weights": w, "dataset": ds, "rows": len(refs),
                   "new_tokens": cfg.new_tokens,
                   "rougeL_fp": round(statistics.mean(score["fp", r] for r in refs), 2),
                   "rougeL": round(statistics.mean(score[w, r] for r in refs), 2),
                   "rougeL_delta": round(statistics.mean(diff), 2),
                   "rougeL_delta_se": round(statistics.stdev(diff) / len(diff) ** 0.5, 2),
                   "rows_identical_to_fp": sum(outputs[w][(ds, r)]["ids"] == outputs["fp"][(ds, r)]["ids"]
                                               for r in refs)}
            print(f"{w} {ds}: ROUGE-L {rec['rougeL']} vs fp {rec['rougeL_fp']} ({rec['rougeL_delta']:+.2f} "
                  f"+- {rec['rougeL_delta_se']}), {rec['rows_identical_to_fp']}/{len(refs)} rows identical",
                  file=sys.stderr)
            recs.append(rec)
    return recs


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=2, help="use the first N prompts of bench_decode")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory", action="store_true", help="peak RSS of one-shot processes instead")
    ap.add_argument("--quality", action="store_true", help="ROUGE-L of RTN formats against fp32 instead")
    ap.add_argument("--formats", default="q8_0,q4_1", help="the RTN formats --quality compares with fp")
    ap.add_argument("--data-dir", default=None, help="cee-bench's data folder, for --quality")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "lowbit_cpu.jsonl")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import cee_gen
    from cee_gen.engine import Decoder
    from cee_gen.generate import encode_prompt
    from cee_gen.weights.default_model import ensure_default_gguf

    gguf = ensure_default_gguf()
    common = {"machine": machine_info(), "versions": versions(), "commit": git_commit(),
              "model": "SmolLM2-135M-Instruct", "gguf": gguf.name, "batch": 1, "greedy": True,
              "threads": args.threads, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if args.memory:
        records = memory(gguf, common)
    elif args.quality:
        records = quality(args, common)
    else:
        records = decode(args, gguf, common, cee_gen, Decoder, encode_prompt)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    print(f"wrote {len(records)} records to {args.out}")


def decode(args, gguf, common, cee_gen, Decoder, encode_prompt) -> list[dict]:
    engines = args.engines.split(",")
    unknown = set(engines) - set(ENGINES)
    if unknown:
        raise SystemExit(f"unknown engine(s) {', '.join(sorted(unknown))}: use {', '.join(ENGINES)}")
    fp = cee_gen.load_model(None, device="cpu", weights="fp")  # explicit: the default is auto (gguf)
    prompts = [encode_prompt(fp, p, None) for p in PROMPTS[:args.prompts]]
    n = args.new_tokens
    runners, nets, skipped = {}, {"ours-fp": fp.net}, {}
    if "hf" in engines:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(fp.path, dtype=torch.float32).eval()
        runners["hf"] = lambda ids: run_hf(hf, ids, n)
        nets["hf"] = fp.net
    for name, (weights, compile) in OURS.items():
        if name in engines:
            net = fp.net if weights == "fp" else cee_gen.load_model(None, device="cpu", weights=weights).net
            nets[name] = net
            dec = Decoder(net, compile=compile)
            runners[name] = lambda ids, dec=dec: run_ours(dec, ids, n)
    if "llama.cpp" in engines:
        run, why = llama_cpp_runner(gguf, args.threads, n, max(map(len, prompts)) + n + 8)
        if run is None:
            print(f"llama.cpp: skipped: {why}", file=sys.stderr)
            skipped["llama.cpp"] = why
        else:
            runners["llama.cpp"] = run
            nets["llama.cpp"] = nets.get("ours-gguf") or cee_gen.load_model(None, device="cpu",
                                                                             weights="gguf").net

    bw = measure_bandwidth_gbs()
    records = [{**common, "kind": "roofline", "bandwidth_gbs": round(bw, 2), "new_tokens": n,
                "repeats": args.repeats, "skipped": skipped}]
    compile_s, tokens = {e: 0.0 for e in runners}, {}
    for p_i, ids in enumerate(prompts):  # warm-up, compiles
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
                print(f"repeat {r} prompt {p_i} ({len(ids)} tok) {e}: {n / wall:.1f} tok/s", file=sys.stderr)
    for p_i, ids in enumerate(prompts):
        base = statistics.median(times[("ours-fp", p_i)]) if "ours-fp" in runners else None
        for e in runners:
            med = statistics.median(times[(e, p_i)])
            wbytes = weight_bytes_per_token(nets[e])
            rec = {**common, "kind": "decode", "engine": e, "compile": OURS.get(e, (None, False))[1],
                   "prompt_index": p_i, "prompt_tokens": len(ids),
                   "new_tokens": n, "median_s": round(med, 4),
                   "all_s": [round(t, 4) for t in times[(e, p_i)]],
                   "tok_s": round(n / med, 2), "weight_bytes_per_token": wbytes,
                   "achieved_weight_gbs": round(wbytes * n / med / 1e9, 2),
                   "roofline_tok_s": round(bw * 1e9 / wbytes, 1), "compile_s": round(compile_s[e], 1)}
            if base is not None:
                ref = tokens[("ours-fp", p_i)]
                rec["speedup_vs_ours_fp"] = round(base / med, 3)
                same = sum(a == b for a, b in zip(ref, tokens[(e, p_i)]))
                rec["token_agreement_vs_ours_fp"] = same / len(ref)
            records.append(rec)
            print(f"{e:>10} prompt {len(ids):>4} tok: {rec['tok_s']:7.1f} tok/s (roofline "
                  f"{rec['roofline_tok_s']}), x{rec.get('speedup_vs_ours_fp', float('nan')):.2f} vs ours fp, "
                  f"agreement {rec.get('token_agreement_vs_ours_fp', float('nan')):.3f}", file=sys.stderr)
    return records


if __name__ == "__main__":
    main()
