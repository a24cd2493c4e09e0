"""What a user gets by default: the default model, default options, every cost counted.

    python benchmarks/bench_default.py            # both jobs, ours and HF transformers alike

`list` job: `cee_gen.generate(model, prompts, max_new_tokens=64)` over 20 prompts (default batch size,
chat template, greedy, EOS respected; `load_model()`'s default weights, auto: the default model's GGUF
blocks on the CPU), against HF `generate` batched the same way (the same batch size, left-padded, the
same weights as fp32 floats), with `compile=True`, and with weights="fp". Wall time of the whole call,
prefill, padding and compile included; tok/s = generated tokens / wall time. Alternating, median of
--repeats after a warm-up run of each (the compile of `compile=True` is in its first run only, which is
reported apart as what a one-shot process pays).

`cli` job: `cee-generate` as a user runs it, in a fresh process each time: one prompt of ~64 tokens
(wall time, and the time to the first streamed character), and the same 20 prompts through
`--input/--output`; default options against `--compile` and `--weights fp`, and the 20 prompts
through HF `generate` in a fresh process of its own (batched alike), every cost counted.

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
            "weights": "auto",
            "new_tokens": 64, "prompts": len(PROMPTS),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


@torch.inference_mode()
def list_job(args) -> list[dict]:
    import cee_gen
    from cee_gen.bench.suite import hf_model
    from cee_gen.config import GenerationConfig
    from cee_gen.generate import encode_prompt

    model = cee_gen.load_model(None, dtype="float32", device="cpu")  # the default: auto weights
    fp = cee_gen.load_model(None, dtype="float32", device="cpu", weights="fp")  # the same weights, floats
    eos = model.eos_token_ids
    bs = GenerationConfig().batch_size
    hf = hf_model(fp)
    encoded = [encode_prompt(model, p, None) for p in PROMPTS]

    def ours(compile: bool, m=model):
        res = cee_gen.generate(m, PROMPTS, max_new_tokens=64, compile=compile)
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
            "ours compile=True": lambda: ours(True), "ours weights=fp": lambda: ours(False, fp)}
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


HF_JOB = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from cee_gen.config import GenerationConfig
from cee_gen.weights.default_model import ensure_default_model
path = ensure_default_model()
tok = AutoTokenizer.from_pretrained(path)
hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
prompts = [json.loads(line)["prompt"] for line in open(sys.argv[1])]
tok.padding_side = "left"
bs, out = GenerationConfig().batch_size, []
for i in range(0, len(prompts), bs):
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                     tokenize=False) for p in prompts[i:i + bs]]
    x = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        y = hf.generate(**x, max_new_tokens=64, do_sample=False, pad_token_id=tok.pad_token_id)
    out += tok.batch_decode(y[:, x.input_ids.shape[1]:], skip_special_tokens=True)
print(json.dumps(out))
"""


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

    def hf_job():  # the same 20 prompts through HF generate in a fresh process, batched alike
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", HF_JOB, str(src)], check=True, capture_output=True, env=env)
        return None, time.perf_counter() - t0

    cases = {("one prompt, streamed", "default"): lambda: one_shot([]),
             ("one prompt, streamed", "--compile"): lambda: one_shot(["--compile"]),
             ("one prompt, streamed", "--weights fp"): lambda: one_shot(["--weights", "fp"]),
             ("20 prompts, --input", "default"): lambda: job([]),
             ("20 prompts, --input", "--compile"): lambda: job(["--compile"]),
             ("20 prompts, --input", "--weights fp"): lambda: job(["--weights", "fp"]),
             ("20 prompts, --input", "HF generate script (batched alike)"): hf_job}
    for f in cases.values():  # warm-up: the on-disk caches (model, Inductor) as a second run finds them
        f()
    res = {k: [] for k in cases}
    for _ in range(args.repeats):
        for k, f in cases.items():
            res[k].append(f())
    out = []
    hf_key = ("20 prompts, --input", "HF generate script (batched alike)")
    hf_wall = statistics.median(r[1] for r in res[hf_key])
    for (jobname, setting), rs in res.items():
        rec = {"job": f"cee-generate, {jobname}", "setting": setting, "repeats": args.repeats,
               "wall_s": round(statistics.median(r[1] for r in rs), 2)}
        if jobname.startswith("20 prompts"):
            rec["speedup_vs_hf_process"] = round(hf_wall / rec["wall_s"], 3)
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
