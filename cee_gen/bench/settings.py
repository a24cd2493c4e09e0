"""The benchmark grid: which settings `cee-bench` runs (baselines, and every strategy at each of its
thresholds), and how `--strategies` selects among them."""

from __future__ import annotations

from dataclasses import dataclass

from cee_gen.errors import CeeGenError


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
      24, 26, 28); cascade (first 24 layers as the small model, max prob >= 0.95, 0.9);
    - verify mode with n-gram drafts, and with auto drafts (n-gram, else the policy's exits at 0.15).
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
    # verify mode (docs/verify.md): the full model's tokens exactly, faster where drafts are accepted;
    # no knob, so no dev runs and no calibration
    g += [
        Setting("verify ngram", "verify", exit={"strategy": "full", "verify": True, "draft": "ngram"}),
        Setting(
            "verify auto policy t=0.15",
            "verify",
            exit={"strategy": "policy", "threshold": 0.15, "verify": True, "draft": "auto"},
        ),
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
