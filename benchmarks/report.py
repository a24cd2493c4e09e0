"""Turn benchmark JSON lines into the markdown tables shown in the README.

    python benchmarks/report.py benchmarks/results/decode_cpu.jsonl   # latest run in the file

Writes the table to stdout; with --write, also to benchmarks/results/decode_cpu.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def load_latest_run(path: Path) -> list[dict]:
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not recs:
        raise SystemExit(f"{path} holds no records")
    last = recs[-1]["timestamp"]
    return [r for r in recs if r["timestamp"] == last]


def decode_table(recs: list[dict]) -> str:
    roof = next((r for r in recs if r["kind"] == "roofline"), None)
    dec = [r for r in recs if r["kind"] == "decode"]
    m, v = dec[0]["machine"], dec[0]["versions"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads; "
        f"torch {v['torch']}, transformers {v['transformers']}; commit `{dec[0]['commit']}`, "
        f"{dec[0]['timestamp']}.",
        f"Model {dec[0]['model']}, {dec[0]['dtype']}, batch 1, greedy, {dec[0]['new_tokens']} new tokens "
        f"(EOS ignored), median of {dec[0]['repeats']} repeats after a warm-up run.",
    ]
    if roof:
        lines.append(
            f"Measured read bandwidth {roof['bandwidth_gbs']} GB/s; weights read per token "
            f"{roof['weight_bytes_per_token'] / 1e6:.0f} MB; so the batch-1 roofline is "
            f"{roof['roofline_tok_s']} tok/s.")
    lines += ["", "| engine | prompt tokens | tok/s | ms/token | weight GB/s | speed-up vs HF "
              "| token agreement vs HF | compile s (once per process) |", "|---|---|---|---|---|---|---|---|"]
    for r in dec:
        lines.append(
            f"| {r['engine']} | {r['prompt_tokens']} | {r['tok_s']:.2f} | {r['ms_per_token']:.1f} "
            f"| {r['achieved_weight_gbs']:.1f} | {r.get('speedup_vs_hf', float('nan')):.2f}x "
            f"| {r.get('token_agreement_vs_hf', float('nan')):.3f} | {r['compile_s']:.0f} |")
    engines = sorted({r["engine"] for r in dec}, key=[r["engine"] for r in dec].index)
    lines += ["", "| engine | median speed-up vs HF over prompts |", "|---|---|"]
    for e in engines:
        s = [r["speedup_vs_hf"] for r in dec if r["engine"] == e and "speedup_vs_hf" in r]
        if s:
            lines.append(f"| {e} | {statistics.median(s):.2f}x |")
    return "\n".join(lines) + "\n"


def static_exit_table(recs: list[dict]) -> str:
    r0 = recs[0]
    lines = [
        f"Static exit, {r0['model']}, {r0['dtype']}, {r0['engine']}, batch 1, greedy, {r0['new_tokens']} new "
        f"tokens, {r0['prompt_tokens']}-token prompt, median of {r0['repeats']} repeats; "
        f"{r0['machine']['cpu']}, {r0['machine']['cores']} cores; commit `{r0['commit']}`. "
        f"Measured on the full-depth run: t_layer {r0['t_layer_ms']} ms, t_other {r0['t_other_ms']} ms "
        "(embedding, final norm, LM head, token choice).",
        "",
        "| exit | layers run | KV fill | ms/token | of which KV fill | measured speed-up | ideal speed-up "
        "| measured / ideal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in recs:
        fill = f"{r['fill_ms_per_token']:.2f}" if "fill_ms_per_token" in r else "-"
        lines.append(f"| {r['exit']} | {r['exit_layer']} | {r['kv_fill'] or '-'} | {r['ms_per_token']:.1f} "
                     f"| {fill} | {r['measured_speedup']:.2f}x | {r['ideal_speedup']:.2f}x "
                     f"| {r['measured_over_ideal']:.3f} |")
    return "\n".join(lines) + "\n"


def _fill(r: dict) -> str:
    """The KV-fill column: the mode, and for propagate when it ran (records before fill_timing: eager)."""
    if not r["kv_fill"]:
        return "-"
    if r["kv_fill"] != "propagate":
        return r["kv_fill"]
    return f"propagate, {r.get('fill_timing') or 'eager'}"


def strategies_table(recs: list[dict]) -> str:
    r0 = recs[0]
    lines = [
        f"Every strategy, {r0['model']}, {r0['dtype']}, {r0['engine']}, batch 1, greedy, {r0['prompts']} "
        f"held-out prompts x {r0['new_tokens']} new tokens (EOS ignored), median of {r0['repeats']} repeats; "
        f"{r0['machine']['cpu']}, {r0['machine']['cores']} cores; commit `{r0['commit']}`. t_layer "
        f"{r0['t_layer_ms']} ms, t_other {r0['t_other_ms']} ms. Quality is measured against the full "
        "model's own output (ROUGE-L F; share of tokens before the first divergence). A deferred fill "
        "runs inside the layers: its KV-fill time counts in ms/token, not in the KV-fill column.",
        "",
        "| setting | KV fill | mean layers | ideal L/mean | ideal, cost-aware | measured speed-up "
        "| ms/token | decisions ms/token | KV fill ms/token | ROUGE-L vs full | agreeing prefix |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in recs:
        lines.append(
            f"| {r['setting']} | {_fill(r)} | {r['mean_layers']:.1f} | {r['ideal_speedup']:.2f}x "
            f"| {r['ideal_speedup_cost_aware']:.2f}x | {r['measured_speedup']:.2f}x "
            f"| {r['ms_per_token']:.1f} "
            f"| {r['decision_ms_per_token']:.2f} | {r['fill_ms_per_token']:.2f} | {r['rougeL_vs_full']:.3f} "
            f"| {r['prefix_agreement_vs_full']:.2f} |")
    lines += ["", "The first prompt's output (\"Explain how a rainbow forms.\"), first 160 characters:", "",
              "| setting | output |", "|---|---|"]
    for r in recs:
        text = " ".join(r["sample"].split()).replace("|", "\\|")
        lines.append(f"| {r['setting']} | {text} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("path", type=Path, nargs="?",
                    default=Path(__file__).parent / "results" / "decode_cpu.jsonl")
    ap.add_argument("--write", action="store_true", help="also write <path>.md beside the JSON lines")
    args = ap.parse_args(argv)
    table = decode_table(load_latest_run(args.path))
    print(table)
    static = args.path.parent / "static_exit_cpu.jsonl"
    static_table = static_exit_table(load_latest_run(static)) if static.exists() else ""
    print(static_table)
    strat_tables = {}
    for name in ("strategies_cpu.jsonl", "strategies_compiled_cpu.jsonl"):  # eager; --compile
        strat = args.path.parent / name
        if strat.exists():
            strat_tables[strat] = strategies_table(load_latest_run(strat))
            print(strat_tables[strat])
    if args.write:
        args.path.with_suffix(".md").write_text(table)
        if static_table:
            static.with_suffix(".md").write_text(static_table)
        for strat, t in strat_tables.items():
            strat.with_suffix(".md").write_text(t)


if __name__ == "__main__":
    main()
