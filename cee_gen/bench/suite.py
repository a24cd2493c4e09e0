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
from pathlib import Path

import torch

from cee_gen.bench.config import BenchConfig
from cee_gen.bench.env import PeakMemory, git_commit, machine_info, versions
from cee_gen.bench.settings import BASELINES, Setting, grid, select
from cee_gen.bench.summary import calibrate, summarize
from cee_gen.config import ExitConfig
from cee_gen.errors import CeeGenError
from cee_gen.files import write_text
from cee_gen.progress import Progress

IDENTITY_FIELDS = (
    "model",
    "heads",
    "new_tokens",
    "repetition_penalty",
    "template",
    "max_prompt_tokens",
    "dtype",
    "weights",
    "repeats",
)
ADDED_LATER = {"weights": "fp"}  # identity fields newer than some journals: those were made with this value


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
                head, identity = {**ADDED_LATER, **head}, {**ADDED_LATER, **identity}
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
            "tokens_per_pass": (r.stats.get("verify") or {}).get("tokens_per_pass"),
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

    model = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, weights=cfg.weights)
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
        base = (load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, weights=cfg.weights) if cfg.base
                else None)
        hf = hf_model(model) if cfg.hf else None
        runner = Runner(cfg, model, heads, base, hf)
        commit = git_commit()  # of the code that makes these outputs; summaries list every one
        say(f"{len(work)} (setting, row) runs to do, {len(journal.done)} done before; journal {journal_path}")
        warm = set()
        bar = Progress(len(work), "cee-bench", "runs", lines=10, enabled=progress)
        for ds, split, row, text, s in work:
            ids = encode_prompt(model, text, chat=False)
            if len(ids) + cfg.new_tokens > ctx:
                raise CeeGenError(
                    f"{ds} row {row}: {len(ids)} prompt tokens + {cfg.new_tokens} new exceed "
                    f"the {ctx}-token context: lower --max-prompt-tokens"
                )
            if s.label not in warm:  # warm-up, not recorded: first call of each setting in this process
                runner.once(s, ids, text, 2)
                warm.add(s.label)
            res = runner.run(s, ids, text)
            journal.add(
                {"dataset": ds, "split": split, "setting": s.label, "row": row, **res, "commit": commit}
            )
            bar.update(1, f"{ds}/{split} {s.label}")
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
