"""`cee-bench`'s settings: every field of `BenchConfig` is a flag (`dev_limit` -> `--dev-limit`); its
presets fill the fields left at None."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from cee_gen.config import DTYPES, WEIGHTS, check_choices
from cee_gen.config import field_help as _f
from cee_gen.errors import CeeGenError

BENCH_PRESETS = {
    # The CPU default: sized so the three sets finish in under an hour on a 2-core CPU (batch 1,
    # every setting below on every row); the chat template the shipped heads were trained with.
    "cpu": dict(limit=10, dev_limit=5, new_tokens=32, repetition_penalty=1.0, template="chat",
                max_prompt_tokens=384),
    # ConsistentEE's evaluation: greedy, repetition penalty 1.2, 128 new tokens,
    # the Alpaca and CNN/DM templates. Sized for a GPU.
    "authors": dict(limit=100, dev_limit=50, new_tokens=128, repetition_penalty=1.2, template="own",
                    max_prompt_tokens=1024),
    # The CI smoke test: a few rows, a few tokens, one setting per strategy family.
    "quick": dict(limit=2, dev_limit=2, new_tokens=6, repetition_penalty=1.0, template="chat",
                  max_prompt_tokens=128),
}
CALIBRATION_TARGETS = ("rougeL_drop", "agreement")


@dataclass
class BenchConfig:
    """`cee-bench`: datasets x strategies x thresholds on one model with one heads file
    (cee_gen/bench/suite.py). Every field is a flag (`dev_limit` -> `--dev-limit`); fields left at
    None take the preset's value."""

    @staticmethod
    def preset_default(name: str) -> str | None:
        """What each preset gives a field, for --help: "10 with --preset cpu, 100 authors, 2 quick"."""
        vals = [(p, v[name]) for p, v in BENCH_PRESETS.items() if name in v]
        if not vals:
            return None
        (p0, v0), rest = vals[0], vals[1:]
        return f"{v0} with --preset {p0}, " + ", ".join(f"{v} {p}" for p, v in rest)

    model: str | None = _f(None, "checkpoint folder, .gguf or hub id (default: the embedded SmolLM2)")
    heads: str | None = _f(None, "exit-heads file every strategy uses (default: the heads shipped for "
                           "the default model)")
    preset: str = _f("cpu", "cpu (the three sets in under an hour on 2 CPU cores), authors "
                     "(ConsistentEE's protocol: repetition penalty 1.2, 128 tokens, their templates) "
                     "or quick (CI smoke test)", choices=tuple(BENCH_PRESETS))
    datasets: str = _f("alpaca,dolly,cnndm", "comma-separated sets: alpaca, dolly, cnndm")
    data_dir: str | None = _f(None, "folder of the gzip JSON Lines sets (default: $CEE_GEN_DATA, else "
                              "the hub)")
    limit: int | None = _f(None, "test rows per set (the first of the test split)")
    dev_limit: int | None = _f(None, "dev rows per set for threshold calibration (0: no calibration)")
    new_tokens: int | None = _f(None, "new tokens per prompt at most (EOS ends a row earlier)")
    repetition_penalty: float | None = _f(None, "repetition penalty (1.0 = off)")
    template: str | None = _f(None, "prompt template: chat, or own (each set's: alpaca for Alpaca and "
                              "Dolly, cnndm for CNN/DM)", choices=("chat", "own"))
    max_prompt_tokens: int | None = _f(None, "prompt length limit (the article or input is cut)")
    strategies: str | None = _f(None, "strategy families to run, comma-separated (default: all of "
                                "them; see cee_gen/bench/suite.py: grid)")
    hf: bool = _f(True, "run HF transformers generate on the same prompts and weights, as a baseline",
                  flag="--no-hf", negate=True)
    base: bool = _f(True, "run the original model (without the heads file's LoRA) at full depth",
                    flag="--no-base", negate=True)
    targets: str = _f("rougeL_drop:1,agreement:0.9", "calibration targets on dev: rougeL_drop:X "
                      "(ROUGE-L at most X points below full depth) and/or agreement:A (token "
                      "agreement with full depth >= A)")
    repeats: int = _f(1, "timed runs per (setting, row); the median is kept (outputs must repeat)")
    dtype: str = _f("float32", "weights and compute dtype", choices=DTYPES)
    weights: str = _f("fp", "weight format: fp, gguf, q8_0, q4_1, q4_0 (as cee-generate --weights)",
                      choices=WEIGHTS)
    device: str = _f("cpu", "cpu, cuda, cuda:N or auto")
    out: str = _f("bench_results/bench.jsonl", "summary JSON lines; beside it <out>.rows.jsonl (every "
                  "output, for resume), <out>.md and <out>_<set>.png")
    fresh: bool = _f(False, "start over instead of resuming from <out>.rows.jsonl")
    report_only: bool = _f(False, "only rebuild the summaries, tables and plots from <out>.rows.jsonl")

    def resolved(self) -> BenchConfig:
        """A copy with the preset's values filled in, validated."""
        check_choices(self)
        p = BENCH_PRESETS[self.preset]
        kw = {k: (p[k] if getattr(self, k) is None else getattr(self, k)) for k in p}
        return dataclasses.replace(self, **kw).validate()

    def validate(self) -> BenchConfig:
        def bad(msg):
            raise CeeGenError(msg)

        for name in ("limit", "new_tokens", "max_prompt_tokens", "repeats"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                bad(f"{name} must be a positive integer, got {v!r}")
        if self.dev_limit is not None and (not isinstance(self.dev_limit, int) or self.dev_limit < 0):
            bad(f"dev_limit must be an integer >= 0, got {self.dev_limit!r}")
        rp = self.repetition_penalty
        if rp is not None and (not isinstance(rp, (int, float)) or not math.isfinite(rp) or rp <= 0):
            bad(f"repetition_penalty must be a positive number, got {rp!r}")
        check_choices(self)
        if not [d for d in self.datasets.split(",") if d.strip()]:
            bad("datasets is empty: give a comma-separated list, e.g. alpaca,dolly,cnndm")
        self.target_list()
        if not self.out:
            bad("out must be a file path, e.g. --out results/bench.jsonl")
        return self

    def target_list(self) -> list[tuple[str, float]]:
        out = []
        for part in [p.strip() for p in self.targets.split(",") if p.strip()]:
            name, _, val = part.partition(":")
            try:
                v = float(val)
            except ValueError:
                v = math.nan
            if name not in CALIBRATION_TARGETS or not math.isfinite(v):
                raise CeeGenError(f"calibration target {part!r}: use rougeL_drop:X or agreement:A, e.g. "
                                  "rougeL_drop:1,agreement:0.9")
            if name == "agreement" and not 0 <= v <= 1:
                raise CeeGenError(f"calibration target {part!r}: agreement is a share in [0, 1]")
            out.append((name, v))
        return out
