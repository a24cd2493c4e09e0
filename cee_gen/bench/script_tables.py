"""The focused scripts' tables (benchmarks/: decode, low-bit, static exit, strategies, verify, default
speed): each renders its script's latest run, as `python -m cee_gen.bench.report FILE` writes it beside
the records (report.py)."""

from __future__ import annotations

import statistics

NAMES = {"alpaca": "Alpaca", "dolly": "Dolly", "cnndm": "CNN/DM"}


def cell(x, fmt="{:.2f}", none="-") -> str:
    """A table cell: x formatted, or `none` where there is no value."""
    return none if x is None else fmt.format(x)


def load_latest_run_of(recs: list[dict]) -> list[dict]:
    """The records of the latest run in a file that runs append to (none of none)."""
    if not recs:
        return []
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
        f"Static exit, {r0['model']}, {r0['dtype']}{_weights(r0)}, {r0['engine']}, batch 1, greedy, "
        f"{r0['new_tokens']} new tokens, {r0['prompt_tokens']}-token prompt, median of {r0['repeats']} "
        "repeats; "
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


def _weights(r: dict) -> str:
    """', weights gguf' for records of a weight format other than floats (older records name none)."""
    return f", weights {r['weights']}" if r.get("weights", "fp") != "fp" else ""


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
              cell(r.get("tokens_per_pass")), _accepted(r), cell(r.get("plain_step_share")),
              cell(r["agreement_with_full"], "{:.3f}"), f"{cell(r['identical_rows'], '{}')}/{r['rows']}"]
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
                [[r["job"], r["setting"], f"{r['wall_s']:.2f}", cell(r.get("first_text_s")),
                  cell(r.get("tok_s"), "{:.1f}"),
                  cell(r.get("speedup_vs_hf", r.get("speedup_vs_hf_process")), "{:.2f}x"),
                  cell(r.get("first_run_s"), "{:.1f}"), cell(r.get("same_tokens_as_ours_default"), "{}")]
                 for r in recs])]) + "\n"


def lowbit_table(recs: list[dict]) -> str:
    """bench_lowbit.py: its latest decode run (engines per prompt, and their medians over prompts) and its
    latest --memory run."""
    dec_run = load_latest_run_of([r for r in recs if r["kind"] in ("roofline", "decode")])
    mem = load_latest_run_of([r for r in recs if r["kind"] == "memory"])
    roof = next(r for r in dec_run if r["kind"] == "roofline")
    dec = [r for r in dec_run if r["kind"] == "decode"]
    r0 = dec[0]
    secs = {(r["engine"], r["prompt_index"]): r["median_s"] for r in dec}
    engines = sorted({r["engine"] for r in dec}, key=[r["engine"] for r in dec].index)

    def vs(r: dict, other: str) -> str:
        t = secs.get((other, r["prompt_index"]))
        return "-" if t is None else f"{t / r['median_s']:.2f}x"

    skipped = "; ".join(f"{k}: {v}" for k, v in roof["skipped"].items())
    lines = [
        f"Batch-1 decode, {r0['model']}, greedy, {r0['new_tokens']} new tokens (EOS ignored), "
        f"{r0['threads']} threads, the whole call timed (prefill included), median of {roof['repeats']} "
        f"alternating repeats after a warm-up. {_machine_line(r0)} Measured read bandwidth "
        f"{roof['bandwidth_gbs']} GB/s; the roofline is that over the weight bytes read per token."
        + (f" Not run: {skipped}." if skipped else ""),
        "",
        *_table(["engine", "prompt tokens", "tok/s", "weight MB / token", "weight GB/s", "roofline tok/s",
                 "vs ours fp", "vs llama.cpp", "token agreement vs ours fp", "compile s"],
                [[r["engine"], str(r["prompt_tokens"]), f"{r['tok_s']:.1f}",
                  f"{r['weight_bytes_per_token'] / 1e6:.0f}", f"{r['achieved_weight_gbs']:.1f}",
                  f"{r['roofline_tok_s']:.0f}", vs(r, "ours-fp"), vs(r, "llama.cpp"),
                  cell(r.get("token_agreement_vs_ours_fp"), "{:.3f}"), f"{r['compile_s']:.0f}"]
                 for r in dec]),
        "", "Median over prompts:", "",
        *_table(["engine", "tok/s", "vs ours fp", "vs ours fp compiled", "vs llama.cpp"],
                [[e, f"{statistics.median(r['tok_s'] for r in dec if r['engine'] == e):.1f}",
                  *(_median_ratio(dec, secs, e, o) for o in ("ours-fp", "ours-fp-compiled", "llama.cpp"))]
                 for e in engines]),
    ]
    qual = load_latest_run_of([r for r in recs if r["kind"] == "quality"])
    if qual:
        q0 = qual[0]
        lines += ["", f"Quality of RTN blocks: cee-bench's CPU preset at full depth ({q0['rows']} test rows "
                  f"per set, {q0['new_tokens']} tokens), ROUGE-L F x100 against fp32's on the same rows "
                  f"(mean paired difference +- standard error); commit `{q0['commit']}`, "
                  f"{q0['timestamp']}:", "",
                  *_table(["weights", "set", "ROUGE-L", "fp32", "difference", "rows with fp32's tokens"],
                          [[r["weights"], NAMES.get(r["dataset"], r["dataset"]), f"{r['rougeL']:.2f}",
                            f"{r['rougeL_fp']:.2f}",
                            f"{r['rougeL_delta']:+.2f} +- {r['rougeL_delta_se']:.2f}",
                            f"{r['rows_identical_to_fp']}/{r['rows']}"] for r in qual])]
    if mem:
        lines += ["", f"Peak resident memory of one process, {mem[0]['new_tokens']} new tokens "
                  f"(ru_maxrss); commit `{mem[0]['commit']}`, {mem[0]['timestamp']}:", "",
                  *_table(["process", "peak RSS MB"],
                          [[r["engine"], f"{r['peak_rss_mb']:.0f}"] for r in mem])]
    return "\n".join(lines) + "\n"


def _median_ratio(dec: list[dict], secs: dict, engine: str, other: str) -> str:
    ratios = [secs[(other, r["prompt_index"])] / r["median_s"] for r in dec
              if r["engine"] == engine and (other, r["prompt_index"]) in secs]
    return f"{statistics.median(ratios):.2f}x" if ratios else "-"


def script_table(recs: list[dict]) -> str:
    """The table of a benchmarks/ script's latest run, chosen by its records' fields."""
    if any("gguf" in r for r in recs):  # bench_lowbit.py: decode and memory runs append apart
        return lowbit_table(recs)
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
