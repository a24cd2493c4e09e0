"""The report renders every committed results file to the very table committed beside it."""

import json
from pathlib import Path

import pytest

from cee_gen.bench import report

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
TABLES = sorted(p for p in RESULTS.glob("*.jsonl") if p.with_suffix(".md").is_file())


@pytest.mark.parametrize("path", TABLES, ids=[p.stem for p in TABLES])
def test_committed_table_regenerates_from_its_records(path):
    records = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    if any(r.get("kind") in ("setting", "calibration") for r in records):
        got = report.markdown(records)  # a cee-bench run
    else:
        got = report.script_table(records)
    assert got == path.with_suffix(".md").read_text()


def test_results_of_no_known_benchmark_are_refused():
    with pytest.raises(SystemExit, match="no benchmark this report knows"):
        report.script_table([{"timestamp": "t", "kind": "mystery"}])
