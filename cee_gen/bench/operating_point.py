"""Write a calibrated policy threshold into a heads file, from a `cee-bench` run's dev results.

    python -m cee_gen.bench.operating_point benchmarks/results/bench_cpu.jsonl HEADS.safetensors

The operating point `rougeL_drop:1`: of the policy thresholds the run swept, the lowest (the most
exits) whose ROUGE-L on dev is at most 1 point below full depth's, averaged over the run's sets
(paired, on the same rows). `--exit policy` without `--threshold` then uses it and says so.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from cee_gen.errors import CeeGenError

TARGET = 1.0  # ROUGE-L points below full depth, at most


def choose(records: list[dict]) -> tuple[float, str]:
    """(threshold, how it was chosen) from cee-bench setting records."""
    dev = [r for r in records if r.get("kind") == "setting" and r.get("split") == "dev"
           and r.get("family") == "policy" and r.get("knob") is not None]
    sets = sorted({r["dataset"] for r in dev})
    if not dev:
        raise CeeGenError("these results have no policy settings on dev: run cee-bench with dev rows "
                          "(--dev-limit) and the policy family")
    by_t: dict[float, list[float]] = {}
    for r in dev:
        by_t.setdefault(r["knob"], []).append(r["rougeL_delta"])
    means = {t: statistics.mean(d) for t, d in by_t.items() if len(d) == len(sets)}  # run on every set
    ok = {t: m for t, m in means.items() if m >= -TARGET}
    if not ok:
        raise CeeGenError(f"no policy threshold keeps ROUGE-L within {TARGET:g} point of full depth on dev: "
                          "sweep higher thresholds")
    t = min(ok)
    rows = dev[0]["rows"]
    how = (f"ROUGE-L at most {TARGET:g} point below full depth on dev, mean over {', '.join(sets)} "
           f"({rows} rows each): {ok[t]:+.2f}; swept {sorted(by_t)}")
    return t, how


def main(argv=None) -> None:
    from cee_gen.cli import exit_with
    from cee_gen.exits.heads import set_operating_points

    args = sys.argv[1:] if argv is None else argv

    def body():
        if len(args) != 2:
            raise CeeGenError("usage: python -m cee_gen.bench.operating_point RESULTS.jsonl "
                              "HEADS.safetensors")
        results, heads = Path(args[0]), Path(args[1])
        for p in (results, heads):
            if not p.is_file():
                raise CeeGenError(f"{p} does not exist")
        t, how = choose([json.loads(x) for x in results.read_text().splitlines() if x.strip()])
        set_operating_points(heads, {"rougeL_drop:1": {"threshold": t, "how": how}}, "rougeL_drop:1")
        print(f"{heads}: default policy threshold {t:g} ({how})")
        return 0

    exit_with("operating_point", body)


if __name__ == "__main__":
    main()
