"""From the journal of outputs to summaries: per set x split x setting, quality (ROUGE two ways, token
agreement with full depth), speed-up (median over rows of full depth's ms/token over the setting's,
same row, same run) and exit telemetry; then threshold calibration on dev (`calibrate`)."""

from __future__ import annotations

import statistics

from cee_gen.bench import metrics
from cee_gen.bench.settings import Setting
from cee_gen.config import ExitConfig


def _texts_for_scoring(dataset: str, text: str) -> str:
    return text.lower() if dataset == "cnndm" else text  # the CNN/DM file is lower-cased


def summarize(
    lines: list[dict],
    refs: dict[tuple, str],
    row_order: dict[tuple, list[str]],
    settings: dict[str, Setting],
    n_layers: int,
    common: dict,
) -> list[dict]:
    """Journal lines -> one record per (set, split, setting), over the rows of `row_order` the
    setting has finished. Fields: rows, row_ids; rouge (rouge-score, stemming) and authors_rouge
    (the `rouge` package), each rouge1/2/L x100 against the references; token_agreement and
    rougeL_vs_full (against `full`'s output on the same rows); mean_layers over decode tokens (the
    first token always runs at full depth), exit_histogram, ideal_speedup (L / mean_layers);
    ms_per_token (decode), decode_tok_s, tok_s (prefill included), measured_speedup (median over
    rows of full's ms/token / this one's, same row) and measured_speedup_pooled (ratio of totals);
    peak_mb (max over rows)."""
    from cee_gen.engine import exit_histogram

    by: dict[tuple, dict[str, dict]] = {}
    for rec in lines:
        by.setdefault((rec["dataset"], rec["split"], rec["setting"]), {})[rec["row"]] = rec
    scored: dict[tuple, dict[str, float]] = {}

    def score(ds: str, split: str, label: str, row: str) -> dict[str, float]:
        """rouge-score F of one output against its reference, computed once (full's serves every
        setting's paired difference)."""
        key = (ds, split, label, row)
        if key not in scored:
            text = _texts_for_scoring(ds, by[(ds, split, label)][row]["text"])
            scored[key] = metrics.rouge_f(text, refs[(ds, row)])
        return scored[key]

    out = []
    for (ds, split, label), done in sorted(by.items(), key=lambda kv: kv[0][:2]):
        s = settings.get(label)
        order = row_order.get((ds, split))
        if s is None or order is None:
            continue  # a setting or a set not in this run's selection
        rows = [r for r in order if r in done]
        if not rows:
            continue
        full = by.get((ds, split, "full"), {})
        recs = [done[r] for r in rows]
        hyp = [_texts_for_scoring(ds, x["text"]) for x in recs]
        ref = [refs[(ds, r)] for r in rows]
        dec_layers = [d for x in recs for d in x["layers"][1:]]
        mean = sum(dec_layers) / len(dec_layers) if dec_layers else float(n_layers)
        steps = sum(max(len(x["ids"]) - 1, 0) for x in recs)
        dec_s = sum(x["decode_s"] for x in recs)
        pre_s = sum(x["prefill_s"] for x in recs)

        def ms(x):
            n = len(x["ids"]) - 1
            return 1e3 * x["decode_s"] / n if n > 0 and x["decode_s"] > 0 else None

        ratios = [ms(full[r]) / ms(done[r]) for r in rows if r in full and ms(full[r]) and ms(done[r])]
        full_rows = [full[r] for r in rows if r in full]
        full_ms = (
            (1e3 * sum(x["decode_s"] for x in full_rows) / max(sum(len(x["ids"]) - 1 for x in full_rows), 1))
            if full_rows
            else None
        )
        my_ms = 1e3 * dec_s / steps if steps else None
        agree = [metrics.token_agreement(done[r]["ids"], full[r]["ids"]) for r in rows if r in full]
        vs_full = [
            metrics.rouge_f(_texts_for_scoring(ds, done[r]["text"]), _texts_for_scoring(ds, full[r]["text"]))[
                "rougeL"
            ]
            for r in rows
            if r in full
        ]
        scores = [score(ds, split, label, r) for r in rows]
        # paired ROUGE-L difference to full depth on the same rows, with its standard error: on a
        # few rows, differences within ~2 SE are noise
        diffs = [
            100 * (sc["rougeL"] - score(ds, split, "full", r)["rougeL"])
            for r, sc in zip(rows, scores)
            if r in full
        ]
        out.append(
            {
                **common,
                "kind": "setting",
                "dataset": ds,
                "split": split,
                "setting": label,
                "family": s.family,
                "knob": s.knob,
                "engine": s.engine,
                "exit": s.exit,
                "kv_fill": None
                if s.exit is None or s.exit["strategy"] == "full"
                else ExitConfig(**s.exit).fill,
                "weights": recs[0]["weights"],
                "rows": len(rows),
                "row_ids": rows,
                "rouge": metrics.mean_x100(scores),
                "rougeL_delta": round(statistics.mean(diffs), 2) if diffs else None,
                "rougeL_delta_se": round(statistics.stdev(diffs) / len(diffs) ** 0.5, 2)
                if len(diffs) > 1
                else None,
                "authors_rouge": metrics.mean_x100([metrics.authors_rouge_f(h, r) for h, r in zip(hyp, ref)]),
                "token_agreement": round(statistics.mean(agree), 4) if agree else None,
                "rougeL_vs_full": round(100 * statistics.mean(vs_full), 2) if vs_full else None,
                "mean_layers": round(mean, 3),
                "ideal_speedup": round(n_layers / mean, 3),
                "exit_histogram": {str(k): v for k, v in exit_histogram(dec_layers).items()},
                "tokens": sum(len(x["ids"]) for x in recs),
                "ms_per_token": None if my_ms is None else round(my_ms, 2),
                "decode_tok_s": round(steps / dec_s, 2) if dec_s > 0 else None,
                "tok_s": round(sum(len(x["ids"]) for x in recs) / (dec_s + pre_s), 2)
                if dec_s + pre_s > 0
                else None,
                "prefill_ms": round(1e3 * pre_s / len(recs), 1),
                "measured_speedup": round(statistics.median(ratios), 3) if ratios else None,
                "measured_speedup_pooled": round(full_ms / my_ms, 3) if full_ms and my_ms else None,
                "peak_mb": max((x["peak_mb"] for x in recs if x.get("peak_mb") is not None), default=None),
                "finished_by_eos": sum(x["finish"] == "stop" for x in recs),
                # verify mode: tokens a verify pass gave, mean over rows
                "tokens_per_pass": round(statistics.mean(tpp), 3) if (tpp := [
                    x["tokens_per_pass"] for x in recs if x.get("tokens_per_pass")]) else None,
            }
        )
    return out


def meets(rec: dict, full: dict, target: tuple[str, float]) -> bool:
    name, v = target
    if name == "rougeL_drop":
        return rec["rouge"]["rougeL"] >= full["rouge"]["rougeL"] - v
    return (rec["token_agreement"] or 0.0) >= v


def calibrate(summaries: list[dict], targets: list[tuple[str, float]], common: dict) -> list[dict]:
    """Per set, target and strategy family: on **dev**, the setting with the fewest mean layers
    that meets the target against dev's full depth (ties: the higher ROUGE-L); its **test** record
    is reported beside it. No setting meeting the target: chosen is None (use full depth)."""
    idx = {(r["dataset"], r["split"], r["setting"]): r for r in summaries}
    out = []
    for ds in sorted({r["dataset"] for r in summaries}):
        dev_full = idx.get((ds, "dev", "full"))
        if dev_full is None:
            continue
        fams: dict[str, list[dict]] = {}
        for r in summaries:
            if r["dataset"] == ds and r["split"] == "dev" and r["knob"] is not None:
                fams.setdefault(r["family"], []).append(r)
        for t in targets:
            for fam, recs in fams.items():
                ok = [r for r in recs if meets(r, dev_full, t)]
                best = min(ok, key=lambda r: (r["mean_layers"], -r["rouge"]["rougeL"])) if ok else None
                test = None if best is None else idx.get((ds, "test", best["setting"]))
                test_full = idx.get((ds, "test", "full"))
                keep = (
                    "mean_layers",
                    "ideal_speedup",
                    "measured_speedup",
                    "rouge",
                    "token_agreement",
                    "rows",
                )
                out.append(
                    {
                        **common,
                        "kind": "calibration",
                        "dataset": ds,
                        "target": f"{t[0]}:{t[1]:g}",
                        "family": fam,
                        "chosen": None if best is None else best["setting"],
                        "knob": None if best is None else best["knob"],
                        "dev": None if best is None else {k: best[k] for k in keep},
                        "dev_full_rougeL": dev_full["rouge"]["rougeL"],
                        "test": None if test is None else {k: test[k] for k in keep},
                        "test_full_rougeL": None if test_full is None else test_full["rouge"]["rougeL"],
                        "test_meets_target": None
                        if test is None or test_full is None
                        else meets(test, test_full, t),
                    }
                )
    return out


# ---------------------------------------------------------------------------------------------
# The run.
