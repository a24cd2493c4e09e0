"""Benchmark records -> markdown tables and speed/quality plots: the one report for `cee-bench` and for
the focused scripts in benchmarks/ (their tables: script_tables.py).

    python -m cee_gen.bench.report bench_results/bench.jsonl     # rewrites bench.md and bench_<set>.png
    python -m cee_gen.bench.report benchmarks/results/decode_cpu.jsonl   # rewrites decode_cpu.md

A cee-bench file is rebuilt whole; a benchmark script's file gives the table of its latest run.

Per set (test split): one row per setting with mean layers, ideal and measured speed-up, ms/token,
ROUGE-1/2/L (rouge-score) and the authors' ROUGE-L, agreement with full depth; then the
calibration (threshold chosen on dev for each target, its test result). One PNG per set: ROUGE-L
against measured speed-up (left) and against ideal speed-up L / mean layers (right), one curve per
strategy family, full depth, HF generate and the original model marked.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cee_gen.bench.script_tables import NAMES, cell, script_table
from cee_gen.files import pyplot, save_figure, write_text


def header(r: dict) -> str:
    m, v = r["machine"], r["versions"]
    dev = m.get("gpu") or f"{m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads"
    return (
        f"Model {r['model']} with heads `{r['heads']}`, {r['dtype']}, batch 1, greedy, repetition penalty "
        f"{r['repetition_penalty']:g}, at most {r['new_tokens']} new tokens (EOS ends a row), template "
        f"`{r['template']}`, prompts cut to {r['max_prompt_tokens']} tokens, preset `{r['preset']}`; "
        f"{dev}; torch {v['torch']}, transformers {v['transformers']}; commit `{r['commit']}`, "
        f"{r['timestamp']}."
    )


def _delta(r: dict) -> str:
    d, se = r.get("rougeL_delta"), r.get("rougeL_delta_se")
    if d is None or r["setting"] == "full":
        return "-"
    return f"{d:+.2f}" + (f" ± {se:.2f}" if se is not None else "")


def setting_table(recs: list[dict]) -> list[str]:
    lines = [
        "| setting | KV fill | mean layers | ideal speed-up | measured speed-up | ms/token | tok/s "
        "| ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-L - full (± SE) | authors' ROUGE-L | token agreement "
        "| ROUGE-L vs full's text |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in recs:
        tpp = f" ({r['tokens_per_pass']:.2f} tokens/pass)" if r.get("tokens_per_pass") else ""
        lines.append(
            f"| {r['setting']}{tpp} | {r['kv_fill'] or '-'} | {r['mean_layers']:.2f} "
            f"| {r['ideal_speedup']:.2f}x "
            f"| {cell(r['measured_speedup'], '{:.2f}x')} | {cell(r['ms_per_token'], '{:.1f}')} "
            f"| {cell(r['decode_tok_s'], '{:.1f}')} | {r['rouge']['rouge1']:.2f} "
            f"| {r['rouge']['rouge2']:.2f} "
            f"| **{r['rouge']['rougeL']:.2f}** | {_delta(r)} | {r['authors_rouge']['rougeL']:.2f} "
            f"| {cell(r['token_agreement'], '{:.3f}')} | {cell(r['rougeL_vs_full'])} |"
        )
    return lines


def calibration_table(cal: list[dict]) -> list[str]:
    lines = [
        "| target (on dev) | strategy | chosen on dev | dev: layers / ROUGE-L (full) | test: layers "
        "| test: measured speed-up | test: ROUGE-L (full) | test: agreement | target met on test |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cal:
        if c["chosen"] is None:
            lines.append(
                f"| {c['target']} | {c['family']} | none meets it (use full depth) "
                f"| - ({c['dev_full_rougeL']:.2f}) | - | - | - | - | - |"
            )
            continue
        d, t = c["dev"], c["test"]
        test = (
            "| - | - | - | - | - |"
            if t is None
            else f"| {t['mean_layers']:.2f} | {cell(t['measured_speedup'], '{:.2f}x')} "
            f"| {t['rouge']['rougeL']:.2f} ({cell(c['test_full_rougeL'])}) "
            f"| {cell(t['token_agreement'], '{:.3f}')} "
            f"| {'yes' if c['test_meets_target'] else 'no'} |"
        )
        lines.append(
            f"| {c['target']} | {c['family']} | {c['chosen']} | {d['mean_layers']:.2f} / "
            f"{d['rouge']['rougeL']:.2f} ({c['dev_full_rougeL']:.2f}) {test}"
        )
    return lines


def markdown(records: list[dict]) -> str:
    sets = [r for r in records if r["kind"] == "setting"]
    if not sets:
        return "No finished settings yet.\n"
    out = [header(sets[0]), ""]
    for ds in sorted({r["dataset"] for r in sets}, key=list(NAMES).index):
        test = [r for r in sets if r["dataset"] == ds and r["split"] == "test"]
        dev = [r for r in sets if r["dataset"] == ds and r["split"] == "dev"]
        if test:
            ids = test[0]["row_ids"]
            out += [
                f"### {NAMES.get(ds, ds)}: test split, {len(ids)} rows",
                "",
                f"Rows: {', '.join(ids[:12])}{' ...' if len(ids) > 12 else ''}. Speed-ups are "
                "against our full depth in the same run (measured: median over rows of the per-row "
                "ms/token ratio); ROUGE x100 against the references, and its paired difference to "
                "full depth on the same rows with the standard error; agreement against full "
                "depth's output. Peak resident memory of the process (all models loaded, HF's "
                f"included): {max(r['peak_mb'] or 0 for r in test):.0f} MB.",
                "",
            ]
            out += setting_table(test) + [""]
        cal = [r for r in records if r["kind"] == "calibration" and r["dataset"] == ds]
        if cal:
            n = dev[0]["rows"] if dev else 0
            out += [
                f"Calibration on {NAMES.get(ds, ds)} dev ({n} rows): per strategy, the setting with the "
                "fewest mean layers that meets the target on dev, and what it gives on test.",
                "",
            ]
            out += calibration_table(cal) + [""]
    return "\n".join(out)


def plot(records: list[dict], ds: str, png: Path) -> Path | None:
    plt = pyplot()

    recs = [r for r in records if r["kind"] == "setting" and r["dataset"] == ds and r["split"] == "test"]
    if not recs:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    fams: dict[str, list[dict]] = {}
    for r in recs:
        fams.setdefault(r["family"], []).append(r)
    marks = {
        "full": ("*", "black", "full depth"),
        "hf": ("X", "tab:gray", "HF generate"),
        "base": ("P", "tab:brown", "original model, full depth"),
    }
    for ax, key, name in (
        (axes[0], "measured_speedup", "measured speed-up over full depth"),
        (axes[1], "ideal_speedup", "ideal speed-up L / mean layers"),
    ):
        for fam, rs in fams.items():
            pts = sorted((r[key], r["rouge"]["rougeL"]) for r in rs if r[key] is not None)
            if not pts:
                continue
            if fam in marks:
                m, c, lab = marks[fam]
                ax.scatter(*zip(*pts), marker=m, color=c, s=140, zorder=3, label=lab)
            else:
                ax.plot(*zip(*pts), marker="o", label=fam)
        ax.axvline(1.0, color="gray", lw=0.5)
        ax.set(xlabel=name, title=f"{NAMES.get(ds, ds)} test ({recs[0]['rows']} rows)")
    axes[0].set_ylabel("ROUGE-L F x100 vs references")
    axes[1].legend(fontsize=8, loc="best")
    fig.tight_layout()
    return save_figure(fig, png)


def write(records: list[dict], out: Path) -> list[Path]:
    """<out>.md and one <out>_<set>.png per set."""
    md = out.with_suffix(".md")
    write_text(md, markdown(records))
    pngs = [
        plot(records, ds, out.with_name(f"{out.stem}_{ds}.png"))
        for ds in sorted({r["dataset"] for r in records if r["kind"] == "setting"})
    ]
    return [md] + [p for p in pngs if p]


def main(argv=None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m cee_gen.bench.report RESULTS.jsonl")
    path = Path(args[0])
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: pass a results file (JSON lines) a benchmark wrote")
    records = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    if not records:
        raise SystemExit(f"{path} holds no records")
    if any(r.get("kind") in ("setting", "calibration") for r in records):  # a cee-bench run
        for p in write(records, path):
            print(p)
        return
    md = path.with_suffix(".md")
    write_text(md, script_table(records))
    print(md)


if __name__ == "__main__":
    main()
