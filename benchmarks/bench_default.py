"""What a user gets by default: the default model, default options, every cost counted.

    python benchmarks/bench_default.py            # both jobs, ours and HF transformers alike

`list` job: `cee_gen.generate(model, prompts, max_new_tokens=64)` over 20 prompts (default batch
size, chat template, greedy, EOS respected), against HF `generate` batched the same way (the same
batch size, left-padded, the same weights), and with `compile=True`. Wall time of the whole call,
prefill, padding and compile included; tok/s = generated tokens / wall time. Alternating, median of
--repeats after a warm-up run of each (the compile of `compile=True` is in its first run only, which
is reported apart as what a one-shot process pays).

`cli` job: `cee-generate` as a user runs it, in a fresh process each time: one prompt of ~64 tokens
(wall time, and the time to the first streamed character), and the same 20 prompts through
`--input/--output`; default options against `--compile`.

JSON lines to --out (default benchmarks/results/default_cpu.jsonl); `python -m cee_gen.bench.report`
renders them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cee_gen.bench.env import git_commit, machine_info, versions  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PROMPTS = [
    "Give three tips for staying healthy.", "What is the capital of France?",
    "Write a haiku about the sea.", "Explain how a rainbow forms.",
    "Name three primary colours.", "How do I boil an egg?",
    "Summarize the plot of Romeo and Juliet in two sentences.", "What is photosynthesis?",
    "Translate 'good morning' into Spanish.", "List four animals that live in the ocean.",
    "Why is the sky blue?", "Suggest a name for a pet turtle.",
    "What are the benefits of reading books?", "Describe a sunset in one sentence.",
    "How many days are in a leap year?", "Give an example of a renewable energy source.",
    "What does a thermometer measure?", "Write a short thank-you note to a teacher.",
    "Explain what a computer virus is.", "What is the boiling point of water at sea level?",
]


def common() -> dict:
    return {"kind": "default_speed", "machine": machine_info(), "versions": versions(),
            "commit": git_commit(), "model": "SmolLM2-135M-Instruct", "dtype": "float32",
            "new_tokens": 64, "prompts": len(PROMPTS),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


@torch.inference_mode()
def list_job(args) -> list[dict]:
    import cee_gen
    from cee_gen.bench.suite import hf_model
    from cee_gen.config import GenerationConfig
    from cee_gen.generate import encode_prompt

    model = cee_gen.load_model(None, dtype="float32", device="cpu")
    eos = model.eos_token_ids
    bs = GenerationConfig().batch_size
    hf = hf_model(model)
    encoded = [encode_prompt(model, p, None) for p in PROMPTS]

    def ours(compile: bool):
        res = cee_gen.generate(model, PROMPTS, max_new_tokens=64, compile=compile)
        return [r.token_ids for r in res]

    def hf_batched():
        out = []
        for i in range(0, len(encoded), bs):
            chunk = encoded[i:i + bs]
            T = max(len(x) for x in chunk)
            ids = torch.tensor([[model.pad_token_id] * (T - len(x)) + x for x in chunk])
            mask = torch.tensor([[0] * (T - len(x)) + [1] * len(x) for x in chunk])
            y = hf.generate(ids, attention_mask=mask, max_new_tokens=64, do_sample=False,
                            eos_token_id=eos, pad_token_id=model.pad_token_id)
            for row in y[:, T:].tolist():
                cut = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
                out.append(row[:cut])
        return out

    runs = {"hf generate (batched alike)": hf_batched, "ours default": lambda: ours(False),
            "ours compile=True": lambda: ours(True)}
    first, times, ids = {}, {k: [] for k in runs}, {}
    for name, f in runs.items():  # the first run: what a one-shot process pays (compile included)
        t0 = time.perf_counter()
        ids[name] = f()
        first[name] = time.perf_counter() - t0
        print(f"first run {name}: {first[name]:.1f} s", flush=True)
    for _ in range(args.repeats):
        for name, f in runs.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["hf generate (batched alike)"])
    out = []
    ref = ids["ours default"]
    for name in runs:
        n = sum(len(x) for x in ids[name])
        med = statistics.median(times[name])
        rec = {"job": "generate() over 20 prompts", "setting": name, "batch_size": bs, "tokens": n,
               "wall_s": round(med, 3), "tok_s": round(n / med, 2), "speedup_vs_hf": round(base / med, 3),
               "first_run_s": round(first[name], 2), "repeats": args.repeats,
               "same_tokens_as_ours_default": ids[name] == ref}
        print(json.dumps(rec), flush=True)
        out.append(rec)
    return out


def cli_job(args) -> list[dict]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    exe = [sys.executable, "-m", "cee_gen.cli"]
    tmp = Path(tempfile.mkdtemp())
    src = tmp / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))

    def one_shot(flags):
        t0 = time.perf_counter()
        p = subprocess.Popen([*exe, *flags, "--stream", "--max-new-tokens", "64", PROMPTS[0]],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        p.stdout.read(1)
        ttft = time.perf_counter() - t0
        p.communicate()
        return ttft, time.perf_counter() - t0

    def job(flags):
        t0 = time.perf_counter()
        subprocess.run([*exe, *flags, "--max-new-tokens", "64", "--input", str(src), "--output",
                        str(tmp / "out.jsonl")], check=True, capture_output=True, env=env)
        return None, time.perf_counter() - t0

    cases = {("one prompt, streamed", "default"): lambda: one_shot([]),
             ("one prompt, streamed", "--compile"): lambda: one_shot(["--compile"]),
             ("20 prompts, --input", "default"): lambda: job([]),
             ("20 prompts, --input", "--compile"): lambda: job(["--compile"])}
    for f in cases.values():  # warm-up: the on-disk caches (model, Inductor) as a second run finds them
        f()
    res = {k: [] for k in cases}
    for _ in range(args.repeats):
        for k, f in cases.items():
            res[k].append(f())
    out = []
    for (jobname, setting), rs in res.items():
        rec = {"job": f"cee-generate, {jobname}", "setting": setting, "repeats": args.repeats,
               "wall_s": round(statistics.median(r[1] for r in rs), 2)}
        if rs[0][0] is not None:
            rec["first_text_s"] = round(statistics.median(r[0] for r in rs), 2)
        print(json.dumps(rec), flush=True)
        out.append(rec)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", default="list,cli")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "default_cpu.jsonl")
    args = ap.parse_args(argv)
    c = common()
    recs = []
    for j in args.jobs.split(","):
        recs += {"list": list_job, "cli": cli_job}[j](args)
    with open(args.out, "a") as f:
        for r in recs:
            f.write(json.dumps({**c, **r}) + "\n")
    print(f"wrote {len(recs)} records to {args.out}")


if __name__ == "__main__":
    main()
