"""`cee-bench`: the command line over cee_gen.bench.suite.run; flags are BenchConfig's fields."""

from __future__ import annotations

from cee_gen.bench.config import BenchConfig
from cee_gen.cli import config_from, config_parser, exit_with

EXAMPLES = """\
examples:
  cee-bench --out benchmarks/results/bench_cpu.jsonl     # docs/benchmarks.md's tables and plots (CPU, < 1 h)
  cee-bench --preset quick --out /tmp/quick.jsonl        # smoke test: a few rows and tokens
  cee-bench --datasets alpaca --strategies policy,confidence --limit 50
  cee-bench --preset authors --device cuda --out authors.jsonl
  cee-bench --report-only --out benchmarks/results/bench_cpu.jsonl   # rebuild tables and plots
An interrupted run continues where it stopped when started again with the same --out.
"""


def build_parser():
    return config_parser("cee-bench", "ROUGE and speed-up of every exit strategy on Alpaca, Dolly and "
                         "CNN/DM, with baselines and threshold calibration.", EXAMPLES, BenchConfig)


def main(argv: list[str] | None = None) -> None:
    def body() -> int:
        args = build_parser().parse_args(argv)
        cfg = config_from(args, BenchConfig).resolved()
        from cee_gen.bench.suite import run

        run(cfg)
        return 0

    exit_with("cee-bench", body, process=argv is None)


if __name__ == "__main__":
    main()
