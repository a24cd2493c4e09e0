"""The benchmark harness: datasets x strategies x thresholds on one model with one heads file.

    cee-bench                                   # the CPU preset: Alpaca, Dolly, CNN/DM; < 1 h on 2 cores
    cee-bench --preset authors --device cuda    # ConsistentEE's protocol (sized for a GPU)
    cee-bench --preset quick                    # the CI smoke test

For each set, the first `limit` rows of its **test** split (and `dev_limit` rows of **dev**, for
calibration) are rendered into prompts once; then, row by row, every setting of the grid decodes
that prompt: HF transformers `generate` on the same weights, our full depth, the original model
at full depth (without the heads file's LoRA), and every strategy at each of its thresholds.
Settings are interleaved row by row, so drift on a shared machine hits all of them alike, and the
measured speed-up is the median over rows of full depth's ms/token over this setting's, on the
same row, in the same run. Greedy, batch 1, EOS respected (outputs are compared with references);
ms/token is over the decode steps each run made (prefill excluded; it is the same full-depth
prefill for every setting), the first token's step included in prefill.

Files (from `out`): `<out>.rows.jsonl`, a journal with every output (ids, text, layers per
token, times), one line per (set, split, setting, row), appended as they finish; a run resumes
from it (finished pairs are skipped; a journal made with other generation settings is refused).
`<out>` (the summaries: one JSON object per set x split x setting, plus the calibration
records), `<out>.md` (tables) and `<out>_<set>.png` (plots) are rebuilt from the journal and
written atomically. The summaries' fields are in `summarize`.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cee_gen.bench import metrics
from cee_gen.bench.config import BenchConfig
from cee_gen.bench.env import PeakMemory, git_commit, machine_info, versions
from cee_gen.config import ExitConfig
from cee_gen.errors import CeeGenError
from cee_gen.files import write_text


@dataclass(frozen=True)
class Setting:
    label: str  # unique within a run, e.g. "confidence t=0.95"
    family: str  # one curve in the plots, one calibration: the strategy (+ KV-fill variant)
    knob: float | None = None  # the swept value (threshold, exit layer, patience); None: baselines
    exit: dict | None = None  # ExitConfig fields (heads are added by the suite); None: HF
    engine: str = "ours"  # ours | hf
    weights: str = "tuned"  # tuned (the heads file's LoRA merged, if any) | base

    @property
    def baseline(self) -> bool:
        return self.knob is None


BASELINES = [
    Setting("full", "full", exit={"strategy": "full"}),
    Setting("hf generate", "hf", engine="hf"),
    Setting("base full", "base", exit={"strategy": "full"}, weights="base"),
]


def grid(n_layers: int, quick: bool = False) -> list[Setting]:
    """The settings swept, with layers scaled to the model's depth (shown here for L = 30).

    - static at 20, 24, 27 layers: the control (every token the same depth);
    - policy (ConsistentEE) at p(exit) >= 0.3, 0.15, 0.08 on every layer the heads cover; at 0.15
      also with KV fill copy-kv and recompute (propagate is the default);
    - confidence (max prob >= 0.99, 0.95, 0.9), entropy (normalized entropy <= 0.02, 0.06) and
      patience (2, 3 agreeing layers) read the exit head's logits, an LM-head product per candidate
      layer, so they get the candidates 16, 18, .., 28 (every other layer from ~L/2);
    - saturation (CALM's cosine >= 0.99, 0.95) from layer 16 on; hash (HashEE, frequency buckets at
      24, 26, 28); cascade (first 24 layers as the small model, max prob >= 0.95, 0.9).
    `quick` keeps one setting per family.
    """
    L = n_layers

    def at(frac: float) -> int:
        return max(1, min(L - 1, round(frac * L)))

    lo = at(16 / 30)
    signal = {"exit_layers": ",".join(str(x) for x in range(lo, L, 2)) or str(L - 1)}
    hash_layers = ",".join(str(x) for x in sorted({at(24 / 30), at(26 / 30), at(28 / 30)}))
    g = [
        Setting(f"static k={k}", "static", k, {"strategy": "static", "exit_layer": k})
        for k in sorted({at(20 / 30), at(24 / 30), at(27 / 30)})
    ]
    g += [
        Setting(f"policy t={t}", "policy", t, {"strategy": "policy", "threshold": t})
        for t in (0.3, 0.15, 0.08)
    ]
    g += [
        Setting(
            f"policy t=0.15 {f}", f"policy {f}", 0.15, {"strategy": "policy", "threshold": 0.15, "kv_fill": f}
        )
        for f in ("copy-kv", "recompute")
    ]
    g += [
        Setting(f"confidence t={t}", "confidence", t, {"strategy": "confidence", "threshold": t, **signal})
        for t in (0.99, 0.95, 0.9)
    ]
    g += [
        Setting(f"entropy t={t}", "entropy", t, {"strategy": "entropy", "threshold": t, **signal})
        for t in (0.02, 0.06)
    ]
    g += [
        Setting(f"patience n={n}", "patience", n, {"strategy": "patience", "patience": n, **signal})
        for n in (2, 3)
    ]
    g += [
        Setting(
            f"saturation t={t}",
            "saturation",
            t,
            {"strategy": "saturation", "threshold": t, "min_exit_layer": lo},
        )
        for t in (0.99, 0.95)
    ]
    g += [
        Setting(
            f"hash {hash_layers}",
            "hash",
            float(at(24 / 30)),
            {"strategy": "hash", "exit_layers": hash_layers},
        )
    ]
    g += [
        Setting(
            f"cascade k={at(24 / 30)} t={t}",
            "cascade",
            t,
            {"strategy": "cascade", "exit_layer": at(24 / 30), "threshold": t},
        )
        for t in (0.95, 0.9)
    ]
    if quick:
        seen: set[str] = set()
        g = [s for s in g if not (s.family in seen or seen.add(s.family))]
    return g


def select(settings: list[Setting], families: str | None) -> list[Setting]:
    if families is None:
        return settings
    want = [f.strip() for f in families.split(",") if f.strip()]
    known = sorted({s.family for s in settings})
    unknown = [f for f in want if f not in known]
    if unknown:
        raise CeeGenError(
            f"unknown strategy famil{'y' if len(unknown) == 1 else 'ies'} {unknown}: "
            f"use some of {', '.join(known)}"
        )
    return [s for s in settings if s.family in want]


# ---------------------------------------------------------------------------------------------
# The journal: every output, for resume and for the summaries.

IDENTITY_FIELDS = (
    "model",
    "heads",
    "new_tokens",
    "repetition_penalty",
    "template",
    "max_prompt_tokens",
    "dtype",
    "repeats",
)


class Journal:
    """`<out>.rows.jsonl`: one line per (set, split, setting, row); the first line is the identity
    (model, heads, generation settings) that every later line was made under."""

    def __init__(self, path: Path, identity: dict | None, fresh: bool):
        self.path, self.lines, self.done = path, [], set()
        if fresh and path.exists():
            path.unlink()
        if path.exists():
            text = path.read_text()
            if text and not text.endswith("\n"):  # a line cut by an interruption: drop it, it runs again
                text = text[: text.rfind("\n") + 1]
                path.write_text(text)
            raw = text.splitlines()
            try:
                head = json.loads(raw[0])["identity"]
            except (IndexError, KeyError, json.JSONDecodeError):
                raise CeeGenError(
                    f"{path} is not a cee-bench journal: pass another --out, or --fresh to start over"
                ) from None
            if identity is not None:
                diff = [k for k in IDENTITY_FIELDS if head.get(k) != identity.get(k)]
                if diff:
                    k = diff[0]
                    raise CeeGenError(
                        f"{path} was made with {k}={head.get(k)!r}, this run has "
                        f"{identity.get(k)!r}: pass the same settings to resume, another "
                        "--out, or --fresh to start over"
                    )
            self.identity = head
            for line in raw[1:]:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    raise CeeGenError(f"{path} has a damaged line: pass --fresh to start over") from None
                self.lines.append(rec)
                self.done.add(self.key(rec))
        else:
            if identity is None:
                raise CeeGenError(f"no journal {path} to report on: run cee-bench with this --out first")
            self.identity = identity
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"identity": identity}) + "\n")

    @staticmethod
    def key(rec: dict) -> tuple:
        return rec["dataset"], rec["split"], rec["setting"], rec["row"]

    def add(self, rec: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        self.lines.append(rec)
        self.done.add(self.key(rec))


# ---------------------------------------------------------------------------------------------
# Running one setting on one prompt.


class _Clock:
    """An HF streamer that timestamps its calls: the prompt first, then each new token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_model(model):
    """HF LlamaForCausalLM from the model's folder, carrying our current (merged) weights."""
    from transformers import AutoModelForCausalLM

    from cee_gen.weights.loading import to_hf_state_dict

    hf = AutoModelForCausalLM.from_pretrained(model.path, dtype=model.dtype).to(model.device).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.net), strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise CeeGenError(
            f"HF baseline: weights do not map onto HF's model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}): run with --no-hf"
        )
    return hf


class Runner:
    """The models of a run and how each setting decodes one prompt."""

    def __init__(self, cfg: BenchConfig, model, heads: str, base=None, hf=None):
        self.cfg, self.model, self.heads, self.base, self.hf = cfg, model, heads, base, hf

    def exit_config(self, s: Setting) -> ExitConfig:
        kw = dict(s.exit)
        if s.weights == "tuned":
            kw["heads"] = self.heads
        return ExitConfig(**kw)

    def once(self, s: Setting, ids: list[int], text: str, new_tokens: int) -> dict:
        from cee_gen.generate import generate

        if s.engine == "hf":
            return self._hf(ids, new_tokens)
        m = self.base if s.weights == "base" else self.model
        [r] = generate(
            m,
            [text],
            max_new_tokens=new_tokens,
            repetition_penalty=self.cfg.repetition_penalty,
            chat=False,
            batch_size=1,
            exit=self.exit_config(s),
        )
        if r.prompt_token_ids != ids:
            raise CeeGenError("internal: the prompt encoded differently for two settings")
        return {
            "ids": r.token_ids,
            "text": r.text,
            "layers": r.stats["layers_per_token"],
            "prefill_s": r.stats["prefill_s"],
            "decode_s": r.stats["decode_s"],
            "finish": r.finish_reason,
            "weights": r.stats["weights"],
        }

    def _hf(self, ids: list[int], new_tokens: int) -> dict:
        from transformers import GenerationConfig

        m = self.model
        x = torch.tensor([ids], device=m.device)
        gc = GenerationConfig(
            max_new_tokens=new_tokens,
            do_sample=False,
            repetition_penalty=self.cfg.repetition_penalty,
            eos_token_id=m.eos_token_ids or None,
            pad_token_id=m.pad_token_id,
        )
        clock = _Clock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            y = self.hf.generate(x, attention_mask=torch.ones_like(x), generation_config=gc, streamer=clock)
        t1 = time.perf_counter()
        new = y[0, len(ids) :].tolist()
        eos = set(m.eos_token_ids)
        cut = next((i for i, t in enumerate(new) if t in eos), len(new))
        first = clock.times[1] if len(clock.times) > 1 else t1
        return {
            "ids": new,
            "text": m.tokenizer.decode(new[:cut], skip_special_tokens=True),
            "layers": [m.n_layers] * len(new),
            "prefill_s": first - t0,
            "decode_s": t1 - first,
            "finish": "stop" if cut < len(new) else "length",
            "weights": m.weights.label,
        }

    def run(self, s: Setting, ids: list[int], text: str) -> dict:
        """`repeats` timed runs; the outputs must agree; the median times are kept."""
        runs = []
        with PeakMemory(self.model.device) as mem:
            for _ in range(self.cfg.repeats):
                runs.append(self.once(s, ids, text, self.cfg.new_tokens))
        if any(r["ids"] != runs[0]["ids"] for r in runs):
            raise CeeGenError(f"{s.label}: repeated greedy runs gave different tokens")
        out = dict(runs[0])
        for k in ("prefill_s", "decode_s"):
            out[k] = statistics.median(r[k] for r in runs)
        out["peak_mb"] = None if mem.mb is None else round(mem.mb, 1)
        return out


# ---------------------------------------------------------------------------------------------
# Summaries and calibration.


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


def _prompts(cfg: BenchConfig, model, rows) -> list[str]:
    from cee_gen import data

    template = None if cfg.template == "own" else cfg.template
    return [data.render(r, template, model.tokenizer, cfg.max_prompt_tokens) for r in rows]


def run(cfg: BenchConfig, progress: bool = True) -> list[dict]:
    """Run (or resume) the benchmark of `cfg`; returns the summary and calibration records, also
    written to cfg.out with the tables and plots beside it."""
    from cee_gen import data
    from cee_gen.bench import report
    from cee_gen.generate import encode_prompt, exit_heads, shipped_heads
    from cee_gen.weights.loading import load_model

    cfg = cfg.resolved()
    out = Path(cfg.out)
    journal_path = out.with_name(out.stem + ".rows.jsonl")
    datasets = [d.strip() for d in cfg.datasets.split(",") if d.strip()]
    for d in datasets:
        if d not in data.DATASETS:
            raise CeeGenError(f"unknown dataset {d!r}: use some of {', '.join(data.DATASETS)}")

    def say(msg):
        if progress:
            print(f"cee-bench: {msg}", file=sys.stderr, flush=True)

    model = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    heads = str(Path(cfg.heads).expanduser().resolve()) if cfg.heads else shipped_heads(model)
    exit_heads(model, heads)  # loads the file once; its LoRA deltas (if any) are merged now
    identity = {
        "model": model.name,
        "heads": Path(heads).name,
        **{k: getattr(cfg, k) for k in IDENTITY_FIELDS if k not in ("model", "heads")},
    }
    journal = Journal(journal_path, None if cfg.report_only else identity, cfg.fresh and not cfg.report_only)
    settings = BASELINES + select(grid(model.n_layers, cfg.preset == "quick"), cfg.strategies)
    if not cfg.hf:
        settings = [s for s in settings if s.engine != "hf"]
    if not cfg.base:
        settings = [s for s in settings if s.weights != "base"]

    refs, order, work = {}, {}, []
    for ds in datasets:
        for split, n in (("test", cfg.limit), ("dev", cfg.dev_limit)):
            if not n:
                continue
            rows = data.load_split(ds, split, cfg.data_dir, limit=n)
            order[(ds, split)] = [r.id for r in rows]
            refs.update({(ds, r.id): r.reference for r in rows})
            if not cfg.report_only:
                texts = _prompts(cfg, model, rows)
                split_settings = (
                    settings
                    if split == "test"
                    else [s for s in settings if s.label == "full" or not s.baseline]
                )
                for r, text in zip(rows, texts):
                    for s in split_settings:
                        if (ds, split, s.label, r.id) not in journal.done:
                            work.append((ds, split, r.id, text, s))

    if work:
        ctx = model.args.max_position_embeddings
        base = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device) if cfg.base else None
        hf = hf_model(model) if cfg.hf else None
        runner = Runner(cfg, model, heads, base, hf)
        commit = git_commit()  # of the code that makes these outputs; summaries list every one
        say(f"{len(work)} (setting, row) runs to do, {len(journal.done)} done before; journal {journal_path}")
        warm = set()
        from tqdm import tqdm

        bar = tqdm(work, desc="cee-bench", unit="run", disable=not progress, file=sys.stderr)
        for ds, split, row, text, s in bar:
            ids = encode_prompt(model, text, chat=False)
            if len(ids) + cfg.new_tokens > ctx:
                raise CeeGenError(
                    f"{ds} row {row}: {len(ids)} prompt tokens + {cfg.new_tokens} new exceed "
                    f"the {ctx}-token context: lower --max-prompt-tokens"
                )
            if s.label not in warm:  # warm-up, not recorded: first call of each setting in this process
                runner.once(s, ids, text, 2)
                warm.add(s.label)
            bar.set_postfix_str(f"{ds}/{split} {s.label}", refresh=False)
            res = runner.run(s, ids, text)
            journal.add(
                {"dataset": ds, "split": split, "setting": s.label, "row": row, **res, "commit": commit}
            )
        bar.close()

    common = {
        "model": model.name,
        "heads": Path(heads).name,
        "preset": cfg.preset,
        **{k: journal.identity.get(k) for k in IDENTITY_FIELDS if k not in ("model", "heads")},
        "batch": 1,
        "decoding": "greedy",
        "machine": machine_info(),
        "versions": versions(),
        "commit": ", ".join(sorted({x.get("commit", "unknown") for x in journal.lines})) or git_commit(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    by_label = {s.label: s for s in settings}
    summaries = summarize(journal.lines, refs, order, by_label, model.n_layers, common)
    records = summaries + calibrate(summaries, cfg.target_list(), common)
    write_text(out, "".join(json.dumps(r) + "\n" for r in records))
    report.write(records, out)
    say(f"wrote {out}, {out.with_suffix('.md')} and the plots")
    return records
