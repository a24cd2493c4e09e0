"""Benchmark records -> markdown tables and speed/quality plots: the one report for `cee-bench` and for
the focused scripts in benchmarks/ (decode, static exit, strategies, verify).

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
import statistics
import sys
from pathlib import Path

from cee_gen.files import pyplot, save_figure, write_text

NAMES = {"alpaca": "Alpaca", "dolly": "Dolly", "cnndm": "CNN/DM"}


def _f(x, fmt="{:.2f}", none="-"):
    return none if x is None else fmt.format(x)


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
            f"| {_f(r['measured_speedup'], '{:.2f}x')} | {_f(r['ms_per_token'], '{:.1f}')} "
            f"| {_f(r['decode_tok_s'], '{:.1f}')} | {r['rouge']['rouge1']:.2f} | {r['rouge']['rouge2']:.2f} "
            f"| **{r['rouge']['rougeL']:.2f}** | {_delta(r)} | {r['authors_rouge']['rougeL']:.2f} "
            f"| {_f(r['token_agreement'], '{:.3f}')} | {_f(r['rougeL_vs_full'])} |"
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
            else f"| {t['mean_layers']:.2f} | {_f(t['measured_speedup'], '{:.2f}x')} "
            f"| {t['rouge']['rougeL']:.2f} ({_f(c['test_full_rougeL'])}) "
            f"| {_f(t['token_agreement'], '{:.3f}')} "
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


def load_latest_run_of(recs: list[dict]) -> list[dict]:
    """The records of the latest run in a file that runs append to."""
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


def _machine_line(r: dict) -> str:
    m, v = r["machine"], r["versions"]
    return (f"{m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads; torch {v['torch']}, "
            f"transformers {v['transformers']}; commit `{r['commit']}`, {r['timestamp']}.")


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table's lines: the header, its rule, one line per row of cells."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(r) + " |" for r in rows)]


def verify_curve_table(recs: list[dict]) -> str:
    r0 = recs[0]
    return "\n".join([
        f"Verify pass over k + 1 positions (the newest token and k drafts, full depth from layer 0) "
        f"against one plain decode step, {r0['model']}, {r0['dtype']}, batch 1, median of {r0['repeats']} "
        f"alternating repeats after a warm-up; {_machine_line(r0)}", "",
        *_table(["engine", "k", "positions", "pass ms", "plain step ms", "pass / step"],
                [["compiled" if r["compiled"] else "eager", str(r["k"]), str(r["positions"]),
                  f"{r['pass_ms']:.1f}", f"{r['plain_step_ms']:.1f}", f"{r['pass_over_step']:.2f}"]
                 for r in recs])]) + "\n"


def _accepted(r: dict) -> str:
    """Drafts accepted / proposed per source, and the rate."""
    return ", ".join(f"{s} {r['accepted'][s]}/{r['proposed'][s]} ({r['accepted'][s] / r['proposed'][s]:.2f})"
                     for s in r.get("proposed") or {} if r["proposed"][s]) or "-"


def verify_task_table(recs: list[dict]) -> str:
    r0 = recs[0]
    lines = [
        f"Verify mode on {r0['model']}, {r0['dtype']}, batch 1, greedy, up to {r0['new_tokens']} new tokens "
        f"(EOS respected), up to {r0['max_draft']} drafts a pass; {_machine_line(r0)} Speed-up: median over "
        "rows of the decode-time ratio to our compiled full depth (ours) or to HF plain `generate` (HF's), "
        "in the same run. Agreement: share of positions equal to our full depth's tokens.",
    ]
    for ds in dict.fromkeys(r["dataset"] for r in recs):
        rs = [r for r in recs if r["dataset"] == ds]
        lines += ["", f"### {NAMES.get(ds, ds)}: {rs[0]['rows']} test rows", ""]
        lines += _table(
            ["setting", "speed-up", "over", "ms/token", "tokens per pass", "drafts accepted", "plain steps",
             "agreement", "identical rows"],
            [[r["setting"], f"{r['speedup']:.2f}x", r["speedup_over"], f"{r['ms_per_token']:.1f}",
              _f(r.get("tokens_per_pass")), _accepted(r), _f(r.get("plain_step_share")),
              _f(r["agreement_with_full"], "{:.3f}"), f"{_f(r['identical_rows'], '{}')}/{r['rows']}"]
             for r in rs])
    return "\n".join(lines) + "\n"


def verify_exactness_table(recs: list[dict]) -> str:
    r0 = recs[0]
    return "\n".join([
        f"Greedy verify mode (n-gram drafts, eager, batch 1) against full depth, {r0['model']}, "
        f"{r0['dtype']}, up to {r0['new_tokens']} new tokens, with the linear layers on our small-M kernel "
        "and on torch's matmul; a row diverges where a verify pass's logits flipped a near-tie. "
        f"{_machine_line(r0)}", "",
        *_table(["linear layers", "set", "rows", "tokens", "rows diverged", "first divergence at token"],
                [[r["linear"], NAMES.get(r["dataset"], r["dataset"]), str(r["rows"]), str(r["tokens"]),
                  str(r["rows_diverged"]), ", ".join(map(str, r["first_divergence_at"])) or "-"]
                 for r in recs])]) + "\n"


def default_speed_table(recs: list[dict]) -> str:
    r0 = recs[0]
    return "\n".join([
        f"What a user gets by default: {r0['model']}, {r0['dtype']}, greedy, {r0['new_tokens']} new tokens "
        f"(EOS respected), chat template, {r0['prompts']} prompts; wall time of the whole job (prefill, "
        f"padding, compile where it happens), median of {r0['repeats']} repeats after a warm-up. "
        f"{_machine_line(r0)}", "",
        *_table(["job", "setting", "wall s", "first text s", "tok/s", "speed-up vs HF",
                 "first run s (a fresh process)", "same tokens"],
                [[r["job"], r["setting"], f"{r['wall_s']:.2f}", _f(r.get("first_text_s")),
                  _f(r.get("tok_s"), "{:.1f}"), _f(r.get("speedup_vs_hf"), "{:.2f}x"),
                  _f(r.get("first_run_s"), "{:.1f}"), _f(r.get("same_tokens_as_ours_default"), "{}")]
                 for r in recs])]) + "\n"


def script_table(recs: list[dict]) -> str:
    """The table of a benchmarks/ script's latest run, chosen by its records' fields."""
    recs = load_latest_run_of(recs)
    if any(r.get("kind") == "decode" for r in recs):
        return decode_table(recs)
    if recs[0].get("kind") == "verify_curve":
        return verify_curve_table(recs)
    if recs[0].get("kind") == "verify_task":
        return verify_task_table(recs)
    if recs[0].get("kind") == "default_speed":
        return default_speed_table(recs)
    if recs[0].get("kind") == "verify_exactness":
        return verify_exactness_table(recs)
    if "ideal_speedup_cost_aware" in recs[0]:
        return strategies_table(recs)
    if "exit_layer" in recs[0] and "t_layer_ms" in recs[0]:
        return static_exit_table(recs)
    raise SystemExit("these records are from no benchmark this report knows")


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
